"""`make demo`: generate the sample dataset if missing, prepare its shards, train se_googlenet on a local Ray.

    python -m jobs.demo [--set key=value ...]

Everything lands under demo_data/ (dataset, shards: data.url) and runs/demo/ (checkpoints, metrics, summary.json,
curves.png). Running it again resumes the run named `demo` from its latest checkpoint, or, when it has
finished, prints its summary again. It ends with the commands to run next: evaluate, predict, TensorBoard.
"""
from __future__ import annotations

import argparse
import os
import sys

from data.index import LEGACY_INDEX_NAME, index_url
from distributed.config import ConfigError, load_config
from distributed.run_folder import join
from evaluation.report import CURVES_CHART

RAW = "demo_data/raw"
CONFIG = "configs/demo.yaml"


class OldDemoDataError(RuntimeError):
    """The demo's shard folder was written by an older version of this project (index.json, not _index.json)."""


def ensure_dataset(raw: str, shards: str) -> None:
    """Write the sample dataset to `raw` unless it is there; prepare it into `shards` unless they are there."""
    from data import make_sample

    if os.path.exists(index_url(shards)):
        return
    if os.path.exists(os.path.join(shards, LEGACY_INDEX_NAME)):
        raise OldDemoDataError(f"{shards} holds shards prepared by an older version of this project "
                               f"({LEGACY_INDEX_NAME}; this version reads {os.path.basename(index_url(shards))})")
    if not os.path.exists(os.path.join(raw, "LOC_synset_mapping.txt")):
        report = make_sample(raw, seed=0)
        print(f"[demo] wrote the sample dataset to {raw}: {report['classes']} classes "
              f"({', '.join(report['class_names'])}), {report['train']} train / {report['val']} val images", flush=True)
    from jobs.prepare import prepare

    prepare(raw, shards, shard_size=250)


def next_steps(run: str) -> list[str]:
    """The two lines printed last: what to run on the finished run folder."""
    return [f"[demo] next: python -m jobs.evaluate --checkpoint {run}   then   python -m jobs.predict "
            f"--checkpoint {run} --split test --out {join(run, 'submission.csv')}",
            f"[demo] curves: tensorboard --logdir {join(run, 'tensorboard')}   (or open {join(run, CURVES_CHART)})"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    try:
        cfg = load_config(CONFIG, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = join(cfg.run.storage_path, cfg.run.name)
    try:
        ensure_dataset(RAW, cfg.data.url)
    except OldDemoDataError as e:
        print(f"error: {e}. Remove it and the run trained on it, then run the demo again, which regenerates both:\n"
              f"    rm -rf {cfg.data.url} {run} && make demo", file=sys.stderr)
        return 2
    from jobs.train import main as train

    code = train(["--config", CONFIG, *sum((["--set", o] for o in args.overrides), [])])
    if code == 0:
        print("\n".join(next_steps(run)), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
