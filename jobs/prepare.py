"""Convert the Kaggle ILSVRC layout into WebDataset-style tar shards, one Ray task per shard.

    python -m jobs.prepare --src s3://bucket/imagenet --dst s3://bucket/shards [--shard-size 1000]
        [--splits train,val,test] [--seed 0] [--max-side N] [--quality 90] [--address RAY_ADDRESS]

Every image is stored as a baseline RGB JPEG (CMYK, grayscale, PNG and progressive files are converted once);
`--max-side N` also shrinks images whose longer side exceeds N (off by default; 400 is the recommendation for
224-pixel training, docs/data_pipeline.md). Re-running resumes: shards whose sidecar matches (plan, size, sha256)
are skipped; a running job's shards are never rewritten with other content. See data/prepare.py.
"""
from __future__ import annotations

import argparse
import json
from typing import Callable, Iterable, Iterator

from data.layout import SPLITS
from data.encode import StoreOptions
from data.prepare import DEFAULT_SHARD_SIZE, prepare_dataset
from distributed.cluster import init_ray


def _call(fn: Callable, item):
    return fn(item)


def ray_map(runtime_env: dict | None = None) -> Callable[[Callable, list], Iterator]:
    """A map that runs fn(item) as one Ray task per item (1 CPU each) and yields results as they finish."""
    import ray

    def run(fn: Callable, items: Iterable) -> Iterator:
        task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=[OSError])(_call)
        if runtime_env:
            task = task.options(runtime_env=runtime_env)
        pending = [task.remote(fn, item) for item in items]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])

    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="root of the Kaggle layout (any fsspec URL)")
    p.add_argument("--dst", required=True, help="where the shards, _index.json and _meta/ go (any fsspec URL)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples per shard")
    p.add_argument("--splits", default=",".join(SPLITS), help="comma-separated subset of train,val,test")
    p.add_argument("--seed", type=int, default=0, help="seed of the one-time train shuffle")
    p.add_argument("--max-side", type=int, default=None,
                   help="re-encode images whose longer side exceeds this many pixels (default: keep sizes; "
                        "recommended 400 for 224-pixel training, 320 for training at 176 pixels or less)")
    p.add_argument("--quality", type=int, default=StoreOptions.quality,
                   help="JPEG quality of re-encoded images (default: %(default)s)")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-verify-sha", action="store_true",
                   help="on resume, trust a finished shard's size without re-reading it for its sha256")
    args = p.parse_args(argv)
    args.splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    bad = [s for s in args.splits if s not in SPLITS]
    if bad or not args.splits:
        p.error(f"--splits {','.join(args.splits)}: valid names are {','.join(SPLITS)}")
    if args.shard_size < 1:
        p.error("--shard-size must be >= 1")
    try:
        args.options = StoreOptions(args.max_side, args.quality)
    except ValueError as e:
        p.error(f"--max-side/--quality: {e}")
    return args


def prepare(src: str, dst: str, *, shard_size: int = DEFAULT_SHARD_SIZE, splits: Iterable[str] = SPLITS,
            seed: int = 0, options: StoreOptions = StoreOptions(), address: str | None = None,
            check_sha: bool = True, runtime_env: dict | None = None) -> dict:
    where = init_ray(address)
    print(f"[prepare] Ray: {where}")
    return prepare_dataset(src, dst, shard_size=shard_size, splits=splits, seed=seed, options=options,
                           map_fn=ray_map(runtime_env), check_sha=check_sha)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    summary = prepare(args.src, args.dst, shard_size=args.shard_size, splits=args.splits, seed=args.seed,
                      options=args.options, address=args.address, check_sha=not args.no_verify_sha)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
