"""Predict a split as a Kaggle "ImageNet Object Localization Challenge" submission: five classes and a box each.

    python -m jobs.predict --checkpoint URL [--best] --split test --out submission.csv [--label-format id|wnid]
        [--data URL] [--workers N] [--batch-size 32] [--cam-threshold 0.2] [--address RAY_ADDRESS]
        [--weights scored|raw|ema]

--checkpoint is a checkpoint directory or a run folder (its newest checkpoint; with --best its evaluated
checkpoint of the highest score).

Rows are `ImageId,PredictionString` with up to five `label x_min y_min x_max y_max`; labels are 1-based
LOC_synset_mapping.txt line numbers (`id`, the default) or wnids. Boxes come from class activation maps (whole
image for AlexNet, which has no GAP head). With --split val the top-5 localization error is computed against the
val boxes. --workers N > 1 spreads rank ranges over N Ray tasks ($RAY_ADDRESS, or a local Ray on 127.0.0.1).
Writes the CSV and a JSON summary beside it (`<out>.json`); the summary is also the last line printed.
"""
from __future__ import annotations

import argparse
import json
import sys

import fsspec

from data import ShardIndexError, read_index
from data.layout import EXAMPLES
from distributed.checkpoint import CheckpointError
from distributed.cluster import init_ray
from evaluation.checkpoints import add_checkpoint_arguments, checkpoint_from_args
from evaluation.localize import CAM_THRESHOLD
from evaluation.predict import prediction_summary, run_predictions, write_submission


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p)
    p.add_argument("--split", required=True, choices=("test", "val"))
    p.add_argument("--out", required=True, help="submission CSV (any fsspec URL)")
    p.add_argument("--label-format", choices=("id", "wnid"), default="id",
                   help="id: 1-based line of LOC_synset_mapping.txt (default); wnid: e.g. n01440764")
    p.add_argument("--data", help="shards URL (default: the run config's data.url)")
    p.add_argument("--workers", type=int, default=1, help="Ray tasks over rank ranges (1: in this process)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, help="crop size (default: the run config's data.image_size)")
    p.add_argument("--cam-threshold", type=float, default=CAM_THRESHOLD,
                   help="fraction of the normalised CAM kept before boxing its largest component")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray task (--workers > 1; in-process: "
                   "a GPU is used whenever one is visible)")
    p.add_argument("--address", help="Ray address for --workers > 1 (default: $RAY_ADDRESS, else a local Ray)")
    args = p.parse_args(argv)
    if args.workers < 1 or args.batch_size < 1 or not 0 < args.cam_threshold < 1:
        p.error("--workers and --batch-size must be >= 1 and --cam-threshold in (0, 1)")
    return args


def sidecar_url(out: str) -> str:
    return (out[:-4] if out.endswith(".csv") else out) + ".json"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        predict(args)
    except (CheckpointError, ShardIndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def predict(args: argparse.Namespace) -> None:
    """Predict, write the CSV and its JSON summary, print the summary."""
    ck = checkpoint_from_args(args)
    data_url = args.data or ck.cfg.data.url
    size = args.image_size or ck.cfg.data.image_size
    if args.workers > 1:
        print(f"[predict] Ray: {init_ray(args.address)}, {args.workers} tasks", flush=True)
    records = run_predictions(ck, data_url, args.split, tasks=args.workers, batch_size=args.batch_size,
                              image_size=size, threshold=args.cam_threshold, gpus_per_task=1 if args.gpu else 0)
    write_submission(records, args.out, read_index(data_url).classes, args.label_format)
    summary = prediction_summary(ck, records, data_url, args.split, image_size=size, submission=args.out,
                                 label_format=args.label_format, threshold=args.cam_threshold)
    with fsspec.open(sidecar_url(args.out), "w") as f:
        f.write(json.dumps(summary, indent=1))
    if summary["corrupt"]:
        print(f"WARNING: {len(summary['corrupt'])} images could not be decoded; their rows have no guesses: "
              f"{', '.join(summary['corrupt'][:EXAMPLES])}", file=sys.stderr)
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
