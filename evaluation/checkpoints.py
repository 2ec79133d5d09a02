"""Reading a training checkpoint for inference: choose it (a checkpoint directory, or a run folder's newest or best
evaluated one: `distributed.checkpoint.select_checkpoint`), copy it locally, verify its manifests and return the
run config with the model's unwrapped fp32 weights, from a DDP `state.pt` (model or EMA) or a DeepSpeed
checkpoint of any ZeRO stage and precision. Every file is read with weights_only=True."""
from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from distributed.checkpoint import (CheckpointError, check_weights_only, download, load_state, read_meta,
                                   select_checkpoint)
from distributed.config import Config, config_from_dict
from distributed.model import build_model
from distributed.strategies import DeepSpeedStrategy

WEIGHTS = ("scored", "raw", "ema")  # which weights to read; "scored": those that scored the checkpoint


@dataclass(frozen=True)
class CheckpointWeights:
    """What inference needs from a checkpoint: the run config and the model's unwrapped fp32 state_dict."""

    url: str  # the checkpoint directory
    cfg: Config
    weights: dict
    source: str  # which weights: "model", "ema", "deepspeed module", "deepspeed zero_to_fp32"
    step: int
    epoch: int
    role: str | None = None  # "recovery" or "evaluated" (meta.json); None for checkpoints without one
    score: float | None = None  # an evaluated checkpoint's val top-1 of its scored weights


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[str]:
    """A local directory with the checkpoint's files: the directory itself when local, else a temporary download."""
    parent = tempfile.mkdtemp(prefix="checkpoint-")
    try:
        yield download(url, f"{parent}/checkpoint")
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def deepspeed_weights(directory: str | Path, zero_stage: int) -> tuple[dict, str]:
    """The fp32 model weights of a DeepSpeed checkpoint (tag `zero`, as DeepSpeedStrategy saves it)."""
    tag_dir = Path(directory) / DeepSpeedStrategy.TAG
    if not tag_dir.is_dir():
        raise CheckpointError(f"checkpoint {directory}: no DeepSpeed '{DeepSpeedStrategy.TAG}/' directory")
    check_weights_only(directory)  # every file, before DeepSpeed's zero_to_fp32 (not weights_only) reads any
    if zero_stage < 3:
        # Stages 0-2 keep whole parameters in the module states: fp32 under the precision policy (a checkpoint
        # written before it, with bf16/fp16 sections, holds half-precision ones, which are cast back to fp32).
        states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
        return dict(states["module"]), "deepspeed module"
    # ZeRO-3 partitions the parameters: rebuild them from the fp32 partitions in the optimizer shards.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=DeepSpeedStrategy.TAG)
    return dict(weights), "deepspeed zero_to_fp32"


def select_weights(directory: str, cfg: Config, state: dict, which: str) -> tuple[dict, str]:
    """(state_dict, which weights): the EMA or model entry of state.pt, else the DeepSpeed files.

    `which`: "raw", "ema", or "scored" (the EMA when the run scored checkpoints by it, else the raw weights).
    """
    if which == "scored":
        which = "ema" if cfg.run.checkpoint_score == "ema" else "raw"
    if which == "ema":
        if not state.get("ema"):
            raise CheckpointError(f"checkpoint {directory}: no EMA weights (the run had optim.ema_decay unset)")
        return state["ema"], "ema"
    if state.get("model") is not None:
        return state["model"], "model"
    if cfg.strategy.name == "deepspeed":
        return deepspeed_weights(directory, cfg.strategy.zero_stage)
    raise CheckpointError(f"checkpoint {directory}: state.pt has no 'model' weights and the run's strategy is "
                          f"{cfg.strategy.name!r}, not 'deepspeed'")


def read_checkpoint(url: str, weights: str = "scored", best: bool = False) -> CheckpointWeights:
    """Choose (newest, or best with best=True), download when remote, verify and read a checkpoint's config and
    weights (`weights`: one of WEIGHTS)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}; valid: {', '.join(WEIGHTS)}")
    url = select_checkpoint(url, best=best)
    with local_copy(url) as directory:
        state = load_state(directory)  # checks every manifest first; torch.load(weights_only=True)
        if "config" not in state:
            raise CheckpointError(f"checkpoint {url}: state.pt has no 'config'")
        cfg = config_from_dict(state["config"])
        chosen, source = select_weights(directory, cfg, state, weights)
    meta = read_meta(url) or {}
    return CheckpointWeights(url, cfg, chosen, source, int(state.get("step", 0)), int(state.get("epoch", 0)),
                             meta.get("role"), meta.get("score"))


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --best, --weights and --ema: how every job that reads a checkpoint chooses it."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or run folder (any fsspec URL)")
    parser.add_argument("--best", action="store_true",
                        help="a run folder's best evaluated checkpoint, not its newest")
    parser.add_argument("--weights", choices=WEIGHTS, default="scored",
                        help="scored (default: those that scored the checkpoint, run.checkpoint_score), raw, or "
                             "ema (runs with optim.ema_decay)")
    parser.add_argument("--ema", action="store_const", const="ema", dest="weights", help="same as --weights ema")


def checkpoint_from_args(args: argparse.Namespace) -> CheckpointWeights:
    """read_checkpoint with the choice that add_checkpoint_arguments parsed."""
    return read_checkpoint(args.checkpoint, weights=args.weights, best=args.best)


def build_inference_model(cfg: Config, weights: dict, num_classes: int) -> nn.Module:
    """The run's model with its weights loaded strictly, in eval mode on the CPU."""
    model = build_model(cfg, num_classes)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"the checkpoint's weights do not fit {cfg.model.name} with {num_classes} classes "
                              f"(the dataset's class count); {str(e).splitlines()[0]}") from None
    return model.eval()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
