"""Export a checkpoint for use outside this project: safetensors weights, config, classes and a torch.export program.

    python -m jobs.export --checkpoint runs/demo [--best] --out export [--weights scored|raw|ema] [--data URL]
        [--image-size N]

--checkpoint is a checkpoint directory or a run folder (its newest checkpoint; with --best its evaluated
checkpoint of the highest score), local or s3:// / gs://, written by a DDP or a DeepSpeed (ZeRO 0-3) run.
--weights: the weights that scored the checkpoint (the default), or the raw or EMA weights. Writes into --out (any fsspec URL): model.safetensors (unwrapped fp32
state_dict; for every model but se_googlenet with SE blocks, torchvision's or timm's architecture loads it with
strict=True: config.json names the builder), config.json, classes.json (class index -> wnid -> name, from the data
index the run trained on, or --data) and model.pt2 (torch.export, dynamic batch, normalised NCHW float32 input).
The last line printed is a JSON object naming the files.
"""
from __future__ import annotations

import argparse
import json
import sys

from data import ShardIndexError
from distributed.checkpoint import CheckpointError
from distributed.run_folder import join
from evaluation.checkpoints import add_checkpoint_arguments, checkpoint_from_args
from evaluation.export import CLASSES_FILE, CONFIG_FILE, PROGRAM_FILE, WEIGHTS_FILE, ExportOptions, write_export


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p)
    p.add_argument("--out", required=True, help="output directory (any fsspec URL)")
    p.add_argument("--data", help="shards URL whose index names the classes (default: the run config's data.url)")
    p.add_argument("--image-size", type=int, help="the program's input size (default: the run's data.image_size)")
    args = p.parse_args(argv)
    if args.image_size is not None and args.image_size < 1:
        p.error("--image-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        ck = checkpoint_from_args(args)
        options = ExportOptions(data_url=args.data or ck.cfg.data.url,
                                image_size=args.image_size or ck.cfg.data.image_size)
        config = write_export(ck, options, args.out)
    except (CheckpointError, ShardIndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    upstream = config["upstream"]["code"] if config["upstream"] else "none (use model.pt2)"
    print(f"exported {ck.url} ({config['model']}, {ck.source} weights, step {ck.step}) to {args.out}; "
          f"upstream architecture: {upstream}")
    print(json.dumps({"checkpoint": ck.url, "model": config["model"], "upstream": config["upstream"],
                      "written": [join(args.out, f) for f in (WEIGHTS_FILE, PROGRAM_FILE, CLASSES_FILE,
                                                              CONFIG_FILE)]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
