"""Train a model on ImageNet shards with Ray Train (DDP or DeepSpeed).

    python -m jobs.train --config configs/demo.yaml [--set key=value ...]
    ray job submit --working-dir . -- python -m jobs.train --config configs/se_googlenet.yaml

Without a cluster address (run.address or $RAY_ADDRESS) it starts a local Ray on 127.0.0.1. Running the same
run.name again resumes from its latest checkpoint. The summary JSON is the last line printed.
"""
from __future__ import annotations

import argparse
import json
import sys

from distributed.config import ConfigError, load_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (configs/*.yaml); defaults when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set optim.base_lr=0.2 (repeatable)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from distributed.tracking import tracked_run
    from distributed.trainer import fit
    from evaluation.report import write_curves

    with tracked_run(cfg) as tracking:  # tracking.backend=mlflow: the MLflow run, opened before any worker starts
        summary = fit(cfg)
        write_curves(summary["run_uri"])
        tracking.finish(summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
