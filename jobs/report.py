"""A results page for one or more runs: their top-1/top-5 (and localization error) beside the ILSVRC winners and
the published single models, with the training curves side by side.

    python -m jobs.report runs/se_googlenet runs/googlenet [--best] [--out report]

Each RUN_URL is a run folder `{storage_path}/{run_name}` (any fsspec URL): summary.json and the metrics from
training, results.json from jobs.evaluate and a jobs.predict --split val summary (`*.json` of kind "predict")
when present. Each run's row names its newest checkpoint, or with --best its best evaluated one, and its score.
Writes report.md, report.png and frontier.png (the runs' top-1 against forward GFLOPs beside the published models,
their frontier and the ILSVRC winners' architectures) to --out.
"""
from __future__ import annotations

import argparse
import json
import sys

import fsspec

from distributed.run_folder import join
from evaluation.frontier import frontier_chart, run_points
from evaluation.report import FRONTIER_CHART, read_run, report_chart, report_markdown, run_row

CHART, PAGE = "report.png", "report.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_URL", help="run folders")
    p.add_argument("--best", action="store_true", help="name each run's best evaluated checkpoint, not its newest")
    p.add_argument("--out", default="report", help="output directory (any fsspec URL; default: report)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = [read_run(url, best=args.best) for url in args.runs]
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    fs, path = fsspec.core.url_to_fs(args.out)
    fs.makedirs(path, exist_ok=True)
    report_chart(runs, join(args.out, CHART))
    frontier_chart(run_points(runs), join(args.out, FRONTIER_CHART))
    with fsspec.open(join(args.out, PAGE), "w") as f:
        f.write(report_markdown(runs, CHART))
    print(json.dumps({"written": [join(args.out, PAGE), join(args.out, CHART), join(args.out, FRONTIER_CHART)],
                      "runs": [run_row(r) for r in runs]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
