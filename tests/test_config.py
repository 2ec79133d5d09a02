import glob

import pytest

from distributed.config import Config, ConfigError, load_config, parse_override


def test_defaults_and_yaml_round_trip(tmp_path):
    cfg = load_config("configs/demo.yaml")
    assert cfg.model.name == "se_googlenet" and cfg.run.num_workers == 2
    from distributed.config import config_from_dict, dump_yaml

    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(str(path)) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_overrides_are_typed():
    cfg = load_config("configs/demo.yaml", ["optim.base_lr=0.2", "run.use_gpu=false", "schedule.step_epochs=[1, 2]",
                                            "optim.grad_clip_norm=null", "optim.name=adamw"])
    assert cfg.optim.base_lr == 0.2 and cfg.schedule.step_epochs == [1, 2] and cfg.optim.name == "adamw"
    assert load_config(None, ["optim.base_lr=1"]).optim.base_lr == 1.0  # int accepted for float


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config("configs/demo.yaml", ["optim.learning_rate=0.1"])
    msg = str(e.value)
    assert "optim.learning_rate" in msg and "optim.base_lr" in msg and "configs/demo.yaml" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="valid keys here: model, data"):
        load_config(None, ["trainer.lr=1"])


@pytest.mark.parametrize("override, fragment", [
    ("data.batch_size=abc", "data.batch_size': expected int"),
    ("run.use_gpu=1", "run.use_gpu': expected true/false"),
    ("data.batch_size=0", "data.batch_size' must be > 0"),
    ("strategy.name=horovod", "valid: 'ddp', 'deepspeed'"),
    ("strategy.precision=fp8", "strategy.precision"),
    ("strategy.zero_stage=2", "needs strategy.name=deepspeed"),
    ("run.name=a/b", "run.name"),
    ("optim.base_lr", "must look like key=value"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/demo.yaml", [override])


@pytest.mark.parametrize("overrides, fragment", [
    (["run.checkpoint_score=ema"], "'run.checkpoint_score' = 'ema' needs optim.ema_decay"),
    (["optim.implementation=apex"], "'optim.implementation' = 'apex'; valid: 'auto', 'fused'"),
    (["strategy.name=deepspeed", "optim.ema_decay=0.9999"], "'optim.ema_decay' is supported with strategy.name=ddp"),
    (["strategy.name=deepspeed", "model.compile=true"], "'model.compile' is supported with strategy.name=ddp only"),
    (["strategy.name=deepspeed", "strategy.zero_stage=2", "strategy.precision=fp16"],
     "fp16 with strategy.name=deepspeed needs strategy.zero_stage=0 (got 2)"),
    (["strategy.name=deepspeed", "strategy.deepspeed={gradient_accumulation_steps: 2}"],
     "gradient accumulation is not supported"),
    (["strategy.name=deepspeed", "strategy.deepspeed={bf16: {enabled: true}}"],
     "'strategy.deepspeed.bf16' is not accepted: set strategy.precision"),
])
def test_combinations_the_loop_cannot_run_are_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/demo.yaml", overrides)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=s3://x/y") == ("a.b", "s3://x/y")


def test_config_is_frozen():
    cfg = load_config(None)
    with pytest.raises(Exception):
        cfg.model.name = "x"
