"""Write the small synthetic dataset (procedurally drawn shapes) in the Kaggle ILSVRC layout.

    python -m jobs.make_sample --out demo_data/raw [--classes 5] [--per-class 200] [--val-per-class 40]
        [--test 50] [--seed 0]
"""
from __future__ import annotations

import argparse
import json

from data.sample import SHAPES, make_sample


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m jobs.make_sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="destination root (any fsspec URL)")
    p.add_argument("--classes", type=int, default=5, help=f"number of shape classes, 1..{len(SHAPES)}")
    p.add_argument("--per-class", type=int, default=200, help="train images per class")
    p.add_argument("--val-per-class", type=int, default=40, help="val images per class")
    p.add_argument("--test", type=int, default=50, help="test images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        report = make_sample(args.out, classes=args.classes, per_class=args.per_class,
                             val_per_class=args.val_per_class, test=args.test, seed=args.seed)
    except ValueError as e:
        p.error(str(e))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
