"""models/: registry, output convention, published parameter counts, SE block, initialisation, overfitting, CLI.

CPU only, 64 px images (every model pools adaptively before its classifier), small batches.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor

from models import (
    GoogLeNetOutputs, SEModule, get_model, has_aux, list_models, loss_with_aux, register_model, se_layer,
    split_outputs, summarize,
)
from models.__main__ import main as cli_main
from models.published import ILSVRC_WINNERS, PUBLISHED
from models.summary import count_params

REPO = Path(__file__).resolve().parents[1]
IMAGE = 64
BATCH = {"senet154": 2}  # 115 M parameters: keep its CPU step short; others use 4


def _batch(name: str, size: int = IMAGE) -> Tensor:
    return torch.randn(BATCH.get(name, 4), 3, size, size)


def _meta_params(name: str, **kwargs) -> int:
    with torch.device("meta"):  # shapes only: no init cost
        return count_params(get_model(name, **kwargs))


# ---------------------------------------------------------------- registry


def test_registry_lists_required_models():
    assert {"se_googlenet", "alexnet", "googlenet", "resnet50", "se_resnet50", "senet154"} <= set(list_models())
    assert list_models() == sorted(list_models())


def test_get_model_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="se_googlenet"):
        get_model("inception_v9")


def test_registering_a_name_twice_raises():
    def googlenet(num_classes: int = 1000):  # same name as the registered factory
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="already registered"):
        register_model(googlenet)
    assert "googlenet" in list_models()


# ---------------------------------------------------------------- every registered model


@pytest.mark.parametrize("name", list_models())
def test_output_convention_train_and_eval(name):
    """Train mode: GoogLeNetOutputs for aux-head models, else a tensor; eval mode: always a tensor."""
    torch.manual_seed(0)
    model = get_model(name, num_classes=10)
    x = _batch(name)
    model.train()
    out = model(x)
    logits, aux = split_outputs(out)
    assert logits.shape == (x.shape[0], 10)
    if has_aux(model):
        assert isinstance(out, GoogLeNetOutputs) and len(aux) == 2
        assert all(a.shape == (x.shape[0], 10) for a in aux)
    else:
        assert isinstance(out, Tensor) and aux == []
    assert all(torch.isfinite(t).all() for t in [logits, *aux])
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, Tensor) and out.shape == (x.shape[0], 10) and torch.isfinite(out).all()


INIT_CASES = [(name, {}) for name in list_models()] + [("se_googlenet", {"se_placement": "module"})]


@pytest.mark.parametrize("name,kwargs", INIT_CASES, ids=[n + "".join(f"-{v}" for v in k.values()) for n, k in INIT_CASES])
def test_initialisation_starts_at_chance_and_every_parameter_learns(name, kwargs):
    """At init (train mode, 1000 classes): loss ~ ln(1000) and every parameter gets a finite, non-zero gradient.

    The loss checked is the cross-entropy averaged over all 1000 possible labels, logsumexp(z) - mean(z): the
    expected loss on random labels, without the noise of drawing a few labels for a tiny batch. The gradient
    comes from the training loss: main + 0.3 * sum(aux) on random labels.
    """
    torch.manual_seed(0)
    model = get_model(name, num_classes=1000, **kwargs).train()
    x = _batch(name)
    out = model(x)
    logits, _ = split_outputs(out)
    expected_loss = (torch.logsumexp(logits, 1) - logits.mean(1)).mean().item()
    assert abs(expected_loss - math.log(1000)) < 0.5, expected_loss
    loss_with_aux(out, torch.randint(0, 1000, (x.shape[0],))).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.any()]
    assert not no_grad and not bad and not zero, (no_grad[:5], bad[:5], zero[:5])


# ---------------------------------------------------------------- published parameter counts


@pytest.mark.parametrize(
    "name,kwargs,expected",
    [
        ("alexnet", {}, 61_100_840),
        ("googlenet", {"aux_logits": False}, 6_624_904),
        ("googlenet", {}, 13_004_888),
        ("resnet50", {}, 25_557_032),
        ("se_resnet50", {}, 28_088_024),
        ("senet154", {}, 115_088_984),  # timm's count
        ("se_googlenet", {"se_placement": None}, 13_004_888),
    ],
)
def test_parameter_counts_match_published(name, kwargs, expected):
    assert _meta_params(name, **kwargs) == expected


PUBLISHED_COUNTS = [(name, p.params) for name, entries in PUBLISHED.items() for p in entries if p.params]


@pytest.mark.parametrize("name,expected", PUBLISHED_COUNTS, ids=[n for n, _ in PUBLISHED_COUNTS])
def test_inference_parameters_equal_the_sources_count(name, expected):
    """Every count a source gives (models/published.py) is ours exactly: the architecture is the one measured."""
    assert summarize(name, image_size=64)["params_inference"] == expected


def test_the_frontier_models_are_registered_with_their_counts():
    counted = dict(PUBLISHED_COUNTS)
    for name in ("regnety_016", "resnet18", "resnet34", "efficientnet_b1", "xception"):
        assert name in list_models() and name in counted, name


@pytest.mark.parametrize("name,weights", [
    ("alexnet", torchvision.models.AlexNet_Weights.IMAGENET1K_V1),
    ("googlenet", torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1),
    ("resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    ("resnet34", torchvision.models.ResNet34_Weights.IMAGENET1K_V1),
    ("resnet50", torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
    ("regnety_016", torchvision.models.RegNet_Y_1_6GF_Weights.IMAGENET1K_V2),
    ("efficientnet_b1", torchvision.models.EfficientNet_B1_Weights.IMAGENET1K_V2),
])
def test_summary_matches_torchvision_metadata(name, weights):
    """params at inference = torchvision's num_params; GMACs = its "_ops" (GFLOPS column, really MACs) at the
    weights' own crop (240 px for EfficientNet-B1). The metadata ships with torchvision: nothing is downloaded."""
    s = summarize(name, image_size=weights.transforms().crop_size[0])
    assert s["params_inference"] == weights.meta["num_params"]
    assert s["gmacs"] == pytest.approx(weights.meta["_ops"], abs=0.002)
    assert s["gflops"] == pytest.approx(2 * s["gmacs"])


# ---------------------------------------------------------------- SE-GoogLeNet


def test_se_googlenet_without_se_is_torchvision_googlenet():
    torch.manual_seed(0)
    ours = get_model("se_googlenet", se_placement=None, init="torchvision").eval()
    torch.manual_seed(0)
    reference = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True, transform_input=False).eval()
    ours_sd, ref_sd = ours.state_dict(), reference.state_dict()
    assert list(ours_sd) == list(ref_sd)
    assert all(torch.equal(ours_sd[k], ref_sd[k]) for k in ref_sd)
    x = torch.randn(1, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x))


def test_se_placements_add_parameters_and_differ():
    base = 13_004_888
    branch, module = (_meta_params("se_googlenet", se_placement=p) for p in ("branch", "module"))
    assert branch > base and module > base and branch != module
    assert _meta_params("se_googlenet") == branch  # branch placement is the default


@pytest.mark.parametrize("placement,n_se", [("branch", 9 * 4), ("module", 9)])
def test_se_blocks_sit_where_the_placement_says(placement, n_se):
    model = get_model("se_googlenet", num_classes=10, se_placement=placement)
    assert sum(isinstance(m, SEModule) for m in model.modules()) == n_se
    m = model.inception3a  # branches 64 / 128 / 32 / 32 channels, 256 concatenated
    if placement == "branch":
        assert [se.fc1.out_channels for se in m.branch_attn] == [4, 8, 2, 2]  # C // 16
    else:
        assert m.attn.fc1.in_channels == 256 and m.attn.fc1.out_channels == 16


def test_se_googlenet_rejects_unknown_placement():
    with pytest.raises(ValueError, match="branch"):
        get_model("se_googlenet", se_placement="everywhere")


def test_se_block_gates_channels_from_global_context():
    torch.manual_seed(0)
    se = se_layer(32)
    assert se.fc1.out_channels == 2  # reduction 16
    # Positive (so y / x is the gate), with channel levels that differ between images.
    x = torch.rand(4, 32, 5, 7) * torch.rand(4, 32, 1, 1) * 10 + 0.1
    y = se(x)
    assert y.shape == x.shape
    gate = y / x
    # One factor per (image, channel), the same at every spatial position, strictly inside (0, 1).
    torch.testing.assert_close(gate, gate[..., :1, :1].expand_as(gate))
    assert ((gate > 0) & (gate < 1)).all()
    # The gate depends on the input's channel statistics, not on where things are:
    assert not torch.allclose(gate[0], gate[1])
    perm = torch.randperm(5 * 7)
    shuffled = x.flatten(2)[..., perm].view_as(x)
    torch.testing.assert_close(se(shuffled) / shuffled, gate)
    louder = x.clone()
    louder[:, 0] *= 10
    assert not torch.allclose((se(louder) / louder)[:, 1:], gate[:, 1:])


@pytest.mark.parametrize("placement", ["branch", "module"])
def test_every_se_squeeze_unit_is_active_at_init(placement):
    """No SE block starts with a dead ReLU (it would never learn): all squeeze pre-activations > 0."""
    torch.manual_seed(0)
    model = get_model("se_googlenet", num_classes=10, se_placement=placement).train()
    dead = []
    hooks = [m.fc1.register_forward_hook(lambda m, i, o, n=n: dead.append(n) if not (o > 0).all() else None)
             for n, m in model.named_modules() if isinstance(m, SEModule)]
    model(torch.randn(4, 3, IMAGE, IMAGE))
    for h in hooks:
        h.remove()
    assert not dead


def test_se_googlenet_overfits_one_small_batch():
    """8 random 64 px images, 4 classes: 100 % training accuracy and a main loss < 0.1 within 100 SGD steps.

    Accuracy is read from the main logits of the training-mode forward (batch statistics, dropout on), the
    model being trained. Eval mode reaches 100 % too, but ~50 steps later: BN running statistics
    (momentum 0.1) trail the changing weights, which measures BN's averaging, not learning.
    """
    torch.manual_seed(0)
    model = get_model("se_googlenet", num_classes=4).train()
    x, y = torch.randn(8, 3, IMAGE, IMAGE), torch.arange(8) % 4
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(100):
        out = model(x)
        logits = split_outputs(out)[0]
        if (logits.argmax(1) == y).all() and F.cross_entropy(logits, y).item() < 0.1:
            break
        opt.zero_grad()
        loss_with_aux(out, y).backward()
        opt.step()
    else:
        pytest.fail("se_googlenet did not fit 8 images in 100 steps")


# ---------------------------------------------------------------- outputs helpers


def test_split_outputs_and_loss_with_aux():
    logits, a2, a1 = torch.zeros(2, 3), torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert split_outputs(logits) == (logits, [])
    main, aux = split_outputs(GoogLeNetOutputs(logits, a2, a1))
    assert main is logits and aux[0] is a2 and aux[1] is a1
    assert split_outputs(GoogLeNetOutputs(logits, None, None))[1] == []
    with pytest.raises(TypeError):
        split_outputs({"logits": logits})
    y = torch.tensor([0, 1])
    expected = F.cross_entropy(logits, y) + 0.3 * (F.cross_entropy(a2, y) + F.cross_entropy(a1, y))
    torch.testing.assert_close(loss_with_aux(GoogLeNetOutputs(logits, a2, a1), y), expected)


def test_has_aux_follows_the_aux_logits_flag():
    assert has_aux(get_model("googlenet"))
    assert not has_aux(get_model("googlenet", aux_logits=False))
    assert not has_aux(get_model("resnet50"))
    assert has_aux(torch.nn.DataParallel(get_model("googlenet")))  # wrappers (DDP, DeepSpeed: `.module`)


# ---------------------------------------------------------------- published figures and CLI


def test_published_figures_carry_sources():
    for name in list_models():
        assert name in PUBLISHED, f"{name} has no entry (use '—, ours' for none)"
    for entries in PUBLISHED.values():
        for p in entries:
            assert p.source
            assert all(v is None or 0 < v < 100 for v in (p.top1, p.top5))
    assert [w.year for w in ILSVRC_WINNERS] == list(range(2010, 2018))  # the seed asks for 2010-2017
    assert all(w.source and "image-net.org" in w.source for w in ILSVRC_WINNERS)
    assert all(w.registered is None or w.registered in list_models() for w in ILSVRC_WINNERS)


def test_cli_summary_json_last_line():
    cmd = [sys.executable, "-m", "models", "summary", "se_googlenet", "--json", "--image-size", "64"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    keys = {"name", "params", "params_inference", "trainable_params", "gflops", "gmacs", "image_size", "aux_heads"}
    assert keys <= set(s)
    assert s["name"] == "se_googlenet" and s["image_size"] == 64 and s["aux_heads"] is True
    assert s["params"] > s["params_inference"] > 6_624_904
    assert s["gmacs"] == pytest.approx(s["gflops"] / 2)


def test_cli_list_and_table(capsys):
    assert cli_main(["list"]) == 0
    assert capsys.readouterr().out.split() == list_models()
    assert cli_main(["table"]) == 0
    table = capsys.readouterr().out
    for name in list_models():
        assert f"| {name} |" in table
    assert "—, ours" in table and "FlopCounterMode" in table


def test_cli_rejects_unknown_model():
    with pytest.raises(SystemExit):
        cli_main(["summary", "vgg16"])


@pytest.mark.parametrize("name", ["googlenet", "se_googlenet"])
def test_googlenet_convs_start_at_he_scale(name):
    """torchvision's std-0.01 conv init behind BN makes every step a huge relative change (stuck at chance on the
    sample set); ours uses He init for the convolutions, keeping the SE layers and classifiers small."""
    torch.manual_seed(0)
    model = get_model(name, num_classes=10)
    conv = model.inception4a.branch2[1].conv
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    assert conv.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.1)
    assert model.fc.weight.std().item() < 0.02  # logits start near zero
    legacy = get_model(name, num_classes=10, init="torchvision")
    assert legacy.conv1.conv.weight.std().item() < 0.02
