"""`make demo`: generate the sample dataset if missing, prepare its shards, train se_googlenet on a local Ray.

    python -m jobs.demo [--set key=value ...]

Everything lands under demo_data/ (dataset, shards) and runs/demo/ (checkpoints, metrics, summary.json,
curves.png). Running it again resumes the run named `demo` from its latest checkpoint, or, when it has
finished, prints its summary again.
"""
from __future__ import annotations

import argparse
import os
import sys

from data.index import index_url

RAW = "demo_data/raw"
SHARDS = "demo_data/shards"
CONFIG = "configs/demo.yaml"


def ensure_dataset(raw: str = RAW, shards: str = SHARDS) -> None:
    from data import make_sample

    if not os.path.exists(os.path.join(raw, "LOC_synset_mapping.txt")):
        report = make_sample(raw, seed=0)
        print(f"[demo] wrote the sample dataset to {raw}: {report['classes']} classes "
              f"({', '.join(report['class_names'])}), {report['train']} train / {report['val']} val images", flush=True)
    if not os.path.exists(index_url(shards)):
        from jobs.prepare import prepare

        prepare(raw, shards, shard_size=250)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    ensure_dataset()
    from jobs.train import main as train

    return train(["--config", CONFIG, *sum((["--set", o] for o in args.overrides), [])])


if __name__ == "__main__":
    sys.exit(main())
