"""Reading a training checkpoint for inference: find it (a checkpoint directory or a run folder's newest), copy it
locally, verify its manifests and return the run config with the model's unwrapped fp32 weights, from a DDP
`state.pt` (model or EMA) or a DeepSpeed checkpoint of any ZeRO stage."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import nn

from distributed.checkpoint import CheckpointError, load_state
from distributed.config import Config, config_from_dict
from distributed.run_folder import join
from distributed.strategies import DeepSpeedStrategy
from models import get_model


@dataclass(frozen=True)
class CheckpointWeights:
    """What inference needs from a checkpoint: the run config and the model's unwrapped fp32 state_dict."""

    url: str  # the checkpoint directory
    cfg: Config
    weights: dict
    source: str  # which weights: "model", "ema", "deepspeed module", "deepspeed zero_to_fp32"
    step: int
    epoch: int


def find_checkpoint(url: str) -> str:
    """`url` when it is a checkpoint directory; for a run folder, its newest `checkpoint_*` directory."""
    url = url.rstrip("/")
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    if fs.exists(f"{path}/manifest.rank0.json"):
        return url
    try:
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        raise CheckpointError(f"{url}: does not exist") from None
    names = [n for n in names if n.startswith("checkpoint_")]
    if not names:
        raise CheckpointError(f"{url}: neither a checkpoint directory (no manifest.rank0.json) nor a run folder "
                              "holding checkpoint_* directories")
    return join(url, names[-1])  # checkpoint_<step:010d> sorts by step


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[str]:
    """A local directory with the checkpoint's files: the directory itself when local, else a temporary download."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        yield path
        return
    local = tempfile.mkdtemp(prefix="checkpoint-")
    try:
        fs.get(path.rstrip("/") + "/", local + "/", recursive=True)
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)


def deepspeed_weights(directory: str | Path, zero_stage: int, precision: str) -> tuple[dict, str]:
    """The fp32 model weights of a DeepSpeed checkpoint (tag `zero`, as DeepSpeedStrategy saves it)."""
    tag_dir = Path(directory) / DeepSpeedStrategy.TAG
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint {directory}: no DeepSpeed '{DeepSpeedStrategy.TAG}/' directory")
    if zero_stage < 3 and precision == "fp32":
        # Stages 0-2 keep whole fp32 parameters in the module states; this file loads with weights_only=True.
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return dict(states["module"]), "deepspeed module"
    # ZeRO-3 partitions the parameters and bf16/fp16 runs keep only half-precision ones in the module states:
    # rebuild the fp32 master weights from the optimizer shards. DeepSpeed's loader is not weights_only (it
    # unpickles whatever the files hold): load such checkpoints only from storage you trust.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=DeepSpeedStrategy.TAG)
    return dict(weights), "deepspeed zero_to_fp32"


def select_weights(directory: str, cfg: Config, state: dict, ema: bool) -> tuple[dict, str]:
    """(state_dict, which weights): the EMA or model entry of state.pt, else the DeepSpeed files."""
    if ema:
        if not state.get("ema"):
            raise CheckpointError(f"checkpoint {directory}: no EMA weights (the run had optim.ema_decay unset)")
        return state["ema"], "ema"
    if state.get("model") is not None:
        return state["model"], "model"
    if cfg.strategy.name == "deepspeed":
        return deepspeed_weights(directory, cfg.strategy.zero_stage, cfg.strategy.precision)
    raise CheckpointError(f"checkpoint {directory}: state.pt has no 'model' weights and the run's strategy is "
                          f"{cfg.strategy.name!r}, not 'deepspeed'")


def read_checkpoint(url: str, ema: bool = False) -> CheckpointWeights:
    """Download (when remote), verify the manifests and read config and weights of a DDP or DeepSpeed checkpoint."""
    url = find_checkpoint(url)
    with local_copy(url) as directory:
        state = load_state(directory)  # checks every manifest first; torch.load(weights_only=True)
        if "config" not in state:
            raise CheckpointError(f"checkpoint {url}: state.pt has no 'config'")
        cfg = config_from_dict(state["config"])
        weights, source = select_weights(directory, cfg, state, ema)
    return CheckpointWeights(url, cfg, weights, source, int(state.get("step", 0)), int(state.get("epoch", 0)))


def build_inference_model(cfg: Config, weights: dict, num_classes: int) -> nn.Module:
    """The run's model with its weights loaded strictly, in eval mode on the CPU."""
    model = get_model(cfg.model.name, num_classes=num_classes, **cfg.model.kwargs)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's weights do not fit {cfg.model.name} with {num_classes} classes "
                              f"(the dataset's class count); {str(e).splitlines()[0]}") from None
    return model.eval()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
