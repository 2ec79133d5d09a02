"""Evaluate a checkpoint: top-1/top-5, per-class accuracy and the most confused pairs, beside published figures.

    python -m jobs.evaluate --checkpoint runs/demo [--best] [--data URL] [--split val] [--ten-crop]
        [--batch-size 64] [--loader-workers 2] [--image-size N] [--weights scored|raw|ema] [--out DIR]

--checkpoint is a checkpoint directory or a run folder (its newest checkpoint; with --best its evaluated
checkpoint of the highest score), local or s3:// / gs://, written by a DDP or a DeepSpeed (ZeRO 0-3) run.
--weights: the weights that scored the checkpoint (the default: the EMA's when the run set
run.checkpoint_score=ema), or the raw or EMA weights. --ten-crop adds the 10-crop protocol (softmax averaged)
to the centre crop. Writes results.md, results.json and frontier.png (top-1 against forward GFLOPs beside the
published models) to --out (default: the run folder when the checkpoint is local, else the current directory),
prints the table, and prints the results JSON's headline as the last line.
"""
from __future__ import annotations

import argparse
import json
import sys

from data import ShardIndexError
from distributed.checkpoint import CheckpointError
from evaluation.checkpoints import add_checkpoint_arguments, checkpoint_from_args
from evaluation.classify import evaluate_checkpoint
from distributed.run_folder import join
from evaluation.frontier import frontier_chart, our_point
from evaluation.report import FRONTIER_CHART, default_results_dir, results_markdown, write_results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(p)
    p.add_argument("--data", help="shards URL (default: the run config's data.url)")
    p.add_argument("--split", default="val", help="a labelled split (default: val)")
    p.add_argument("--ten-crop", action="store_true", help="also evaluate 10 crops (TenCrop), softmax averaged")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (x10 crops with --ten-crop)")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--image-size", type=int, help="crop size (default: the run config's data.image_size)")
    p.add_argument("--out", help="directory for results.md / results.json (any fsspec URL)")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.loader_workers < 0 or (args.image_size is not None and args.image_size < 1):
        p.error("--batch-size and --image-size must be >= 1, --loader-workers >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        evaluate(args)
    except (CheckpointError, ShardIndexError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def evaluate(args: argparse.Namespace) -> None:
    """Evaluate, write results.md/json and frontier.png, print the table and the headline."""
    ck = checkpoint_from_args(args)
    results = evaluate_checkpoint(ck, args.data or ck.cfg.data.url, args.split,
                                  image_size=args.image_size or ck.cfg.data.image_size, batch_size=args.batch_size,
                                  loader_workers=args.loader_workers, ten_crop=args.ten_crop)
    out = args.out or default_results_dir(ck.url)
    paths = write_results(results, out)
    best = results["ten_crop"] or results["centre"]  # the chart's point: the best protocol evaluated
    frontier_chart([our_point(f"step {ck.step}", ck.cfg.model.name, best["top1"], results["image_size"],
                              ck.cfg.model.kwargs, len(best["per_class"]))], join(out, FRONTIER_CHART))
    paths = (*paths, join(out, FRONTIER_CHART))
    print(results_markdown(results))
    headline = {k: results[k] for k in ("checkpoint", "model", "weights", "split", "role", "score")}
    for key in ("centre", "ten_crop"):
        if results[key]:
            headline[key] = {m: results[key][m] for m in ("top1", "top5", "loss", "samples")}
    print(json.dumps({**headline, "written": list(paths)}))


if __name__ == "__main__":
    sys.exit(main())
