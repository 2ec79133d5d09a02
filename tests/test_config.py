import glob

import pytest

from distributed.config import Config, ConfigError, config_from_dict, load_config, parse_override


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
    ("data.global_batch_size=abc", "data.global_batch_size': expected int"),
    ("run.use_gpu=1", "run.use_gpu': expected true/false"),
    ("data.global_batch_size=0", "data.global_batch_size' must be > 0"),
    ("data.batch_size=16", "unknown config key 'data.batch_size' (replaced by data.global_batch_size"),
    ("data.shuffle_buffer=500", "unknown config key 'data.shuffle_buffer' (replaced by data.shuffle_buffer_mb"),
    ("run.num_workers=0", "'run.num_workers' must be a count > 0 or a range 'min,max'"),
    ("run.num_workers=3,1", "'run.num_workers' must be a count > 0 or a range 'min,max'"),
    ("run.num_workers=3", "data.global_batch_size=32 cannot be split evenly over 3 ranks; every count of the range "
                          "must divide it. Valid counts: 1, 2, 4, 8, 16, 32"),
    ("run.num_workers=2,4", "data.global_batch_size=32 cannot be split evenly over 3 ranks; every count of the "
                            "range must divide it. Valid counts: 1, 2, 4, 8, 16, 32 (in the range: 2, 4)"),
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
    (["strategy.name=deepspeed", "run.num_workers=1,2"], "a range (elastic) needs strategy.name=ddp"),
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


@pytest.mark.parametrize("value, expected, ray", [
    ("4", 4, 4), ("1,4", [1, 4], (1, 4)), ("[2, 4]", [2, 4], (2, 4)), ("[2, 2]", 2, 2)])
def test_num_workers_takes_a_count_or_an_elastic_range(value, expected, ray):
    """A range (from --set as "min,max", or a YAML list) becomes Ray Train's ScalingConfig(num_workers=(min, max))
    when every count in it divides the global batch (12: 1, 2, 3, 4 all do)."""
    from distributed.trainer import scaling_workers

    cfg = load_config("configs/demo.yaml", [f"run.num_workers={value}", "data.global_batch_size=12"])
    assert cfg.run.num_workers == expected and scaling_workers(cfg) == ray
    assert config_from_dict(cfg.to_dict()) == cfg  # what the workers receive: the normalised value survives
