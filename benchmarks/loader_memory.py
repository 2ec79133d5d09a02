"""One rank's TrainLoader at ImageNet scale: peak resident memory (main process + loader workers), first-batch
latency, steady rate, and what a resume at the end of the epoch reads.

    python -m benchmarks.loader_memory [--json] [--samples 1281167] [--global-batch 1024] [--world 8]
                                       [--loader-workers 8] [--image-size 224] [--shuffle-buffer-mb 4096]

The index lists 1,281,167 train samples in shards of 1,000 (1,282 shards, the last of 167), as `jobs.prepare`
writes ImageNet. The shards are stand-ins: one real shard of 1,000 photo-like JPEGs (500x375, quality 90, about
100 KB each, `benchmarks.data_pipeline.make_jpegs`) and one of its first 167, each hard-linked under every
shard name of the index, with their offset sidecars. Every byte the loader reads is a real tar member; only
the keys repeat.

Memory is sampled every 0.2 s from /proc/<pid>/smaps_rollup of this process and its children: RSS summed
(pages shared between processes, e.g. torch's libraries after fork, count once per process) and PSS summed
(shared pages split between the processes sharing them: the rank's real share of the machine). The baseline
is this process with torch imported, before the loader exists. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torchvision

from benchmarks.data_pipeline import make_jpegs
from data.index import DatasetIndex, ShardInfo, SplitIndex, sidecar_url, write_index
from data.loader import TrainLoader
from data.options import StreamOptions
from data.shards import ShardWriter
from data.stream import build_loader

IMAGENET_TRAIN = 1_281_167
SHARD_SIZE = 1000
STANDIN_INFO = "_standin.json"


def write_real_shard(root: Path, jpegs: list[bytes], name: str) -> ShardInfo:
    path = root / name
    with open(path, "wb") as f:
        w = ShardWriter(f)
        for i, data in enumerate(jpegs):
            w.write(f"img{i:05d}", {"jpg": data, "cls": str(i % 1000).encode()})
        size, sha = w.close()
    side = {"name": name, "samples": len(jpegs), "bytes": size, "sha256": sha, "offsets": w.offsets, "end": w.end}
    meta = Path(sidecar_url(str(root), name))
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(side))
    return ShardInfo(name, len(jpegs), size, sha)


def make_standin(root: Path, samples: int, jpegs: list[bytes]) -> dict:
    """The index of `samples` train samples over hard links to two real shards (see the module docstring)."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    real = root / "real"
    real.mkdir(exist_ok=True)
    full = write_real_shard(root, jpegs[:SHARD_SIZE], "real/full.tar")
    rest = samples % SHARD_SIZE
    tail = write_real_shard(root, jpegs[:rest], "real/tail.tar") if rest else None
    shards = []
    for n in range((samples + SHARD_SIZE - 1) // SHARD_SIZE):
        src = full if (n + 1) * SHARD_SIZE <= samples else tail
        name = f"train/train-{n:06d}.tar"
        for target, source in [(root / name, root / src.name),
                               (sidecar_url(str(root), name), sidecar_url(str(root), src.name))]:
            if not os.path.exists(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.link(source, target)
        shards.append(ShardInfo(name, src.samples, src.bytes, src.sha256))
    write_index(str(root), DatasetIndex([f"n{c:08d}" for c in range(1000)], ["x"] * 1000,
                                        {"train": SplitIndex(shards, samples)}))
    return {"samples": samples, "shards": len(shards), "real_shard_bytes": full.bytes,
            "mean_sample_bytes": round(full.bytes / full.samples)}


def _memory_kb(pid: int) -> tuple[int, int]:
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def _children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out + [g for c in out for g in _children(c)]


class MemorySampler:
    """Peak summed RSS and PSS of this process and its descendants, sampled on a thread."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.every_s, self.peak_rss_kb, self.peak_pss_kb, self.processes = every_s, 0, 0, 0
        self.peak_pss_each_kb: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> tuple[int, int, list[int]]:
        """(RSS sum, PSS sum, PSS of each process: this one first) in kB."""
        rss, each = 0, []
        for pid in [os.getpid(), *_children(os.getpid())]:
            try:
                r, p = _memory_kb(pid)
            except (FileNotFoundError, ProcessLookupError):
                continue  # a process that just ended
            rss += r
            each.append(p)
        return rss, sum(each), each

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            rss, pss, each = self.sample()
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            if pss > self.peak_pss_kb:
                self.peak_pss_kb, self.peak_pss_each_kb = pss, each
            self.processes = max(self.processes, len(each))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def timed_pass(loader: TrainLoader, epoch: int, start: int, steps: int) -> dict:
    """First-batch latency and steady rate of `steps` batches from `start`, with what was read."""
    t0 = time.perf_counter()
    batches = loader.epoch(epoch, start)
    first = next(batches)
    t1 = time.perf_counter()
    n, images = 1, len(first["key"])
    for batch in batches:
        n, images = n + 1, images + len(batch["key"])
        if n >= steps:
            break
    t2 = time.perf_counter()
    return {"first_batch_s": round(t1 - t0, 2), "steps": n, "images": images,
            "steps_per_s_after_first": round((n - 1) / max(t2 - t1, 1e-9), 3), **loader.io_totals()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loader_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=IMAGENET_TRAIN)
    p.add_argument("--global-batch", type=int, default=1024)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--loader-workers", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--shuffle-buffer-mb", type=float, default=4096)
    p.add_argument("--steps", type=int, default=0, help="steps of the first pass (default: through the ramp and "
                                                         "two full windows)")
    p.add_argument("--previous-loader", action="store_true",
                   help="measure the loop's previous loader instead (ShardStream: per-rank batch G / world, a shuffle "
                        "buffer of --shuffle-buffer samples per loader worker)")
    p.add_argument("--shuffle-buffer", type=int, default=5000, help="samples, for --previous-loader")
    p.add_argument("--workdir", help="keep the stand-in dataset here and reuse it (default: a temporary folder)")
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args(argv)
    if args.build_only:
        info = make_standin(Path(args.workdir), args.samples, make_jpegs(SHARD_SIZE))
        Path(args.workdir, STANDIN_INFO).write_text(json.dumps(info))
        return info
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or tmp
        info_path = Path(root, STANDIN_INFO)
        if not info_path.exists() or json.loads(info_path.read_text()).get("samples") != args.samples:
            # In a child process: the JPEGs it generates would otherwise stay in this process's heap, which the
            # loader workers inherit at fork and the memory figures would count.
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "benchmarks.loader_memory", "--build-only", "--workdir", root,
                            "--samples", str(args.samples)], check=True)
            info = {**json.loads(info_path.read_text()), "seconds_to_build": round(time.perf_counter() - t0, 1)}
        else:
            info = json.loads(info_path.read_text())
        result = (run_previous if args.previous_loader else run)(args, root, info)
    if not args.json:
        print(json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


def run(args, url: str, dataset: dict) -> dict:
    opts = StreamOptions(url, image_size=args.image_size, global_batch_size=args.global_batch,
                         loader_workers=args.loader_workers, shuffle_buffer_mb=args.shuffle_buffer_mb)
    sampler = MemorySampler()
    baseline_rss, baseline_pss, _ = sampler.sample()
    with sampler:
        loader = TrainLoader(opts, rank=0, world=args.world)
        order = loader.order
        steps = args.steps or min(order.steps_per_epoch, order.windows[min(len(order.windows) - 1, 5)] + 1)
        first = timed_pass(loader, 0, 0, steps)
        # Resume at the last step of the last full window, the most a resume reads: that window and the rest.
        resume_step = order.windows[-1] - 1
        end = {"step": resume_step, **timed_pass(loader, 0, resume_step, order.steps_per_epoch - resume_step)}
        loader.close()
    per_rank = args.global_batch // args.world
    mb = 1024
    return {
        "dataset": dataset, "global_batch_size": args.global_batch, "world": args.world,
        "loader": "TrainLoader", "rank": 0, "streams_per_rank": per_rank, "loader_workers": args.loader_workers, "image_size": args.image_size,
        "shuffle_buffer_mb": args.shuffle_buffer_mb, "shuffle_buffer_mb_per_rank": args.shuffle_buffer_mb / args.world,
        "window_samples": order.window, "window_starts": order.windows[:6], "steps_per_epoch": order.steps_per_epoch,
        "baseline_main_rss_mb": round(baseline_rss / mb), "baseline_main_pss_mb": round(baseline_pss / mb),
        "peak_rss_sum_mb": round(sampler.peak_rss_kb / mb), "peak_pss_sum_mb": round(sampler.peak_pss_kb / mb),
        "peak_pss_over_baseline_mb": round((sampler.peak_pss_kb - baseline_pss) / mb),
        "processes": sampler.processes, "peak_pss_each_mb": [round(k / mb) for k in sampler.peak_pss_each_kb],
        "first_pass": first, "resume_near_end": end,
        # ShardStream on object storage reads every sample of the rank's range before the resume point
        "previous_loader_resume_bytes_estimate": resume_step * per_rank * dataset["mean_sample_bytes"],
        "cpu": platform.processor() or platform.machine(), "cores_visible": os.cpu_count(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
    }


def run_previous(args, url: str, dataset: dict) -> dict:
    """The same measurement of ShardStream (build_loader), for comparison: memory and first-batch latency."""
    sampler = MemorySampler()
    baseline_rss, baseline_pss, _ = sampler.sample()
    steps = args.steps or 2 * args.loader_workers  # every loader worker has filled its buffer and made batches
    with sampler:
        t0 = time.perf_counter()
        loader = build_loader(url, "train", batch_size=args.global_batch // args.world, rank=0, world_size=args.world,
                              train=True, image_size=args.image_size, num_workers=args.loader_workers, seed=0, epoch=0,
                              shuffle_buffer=args.shuffle_buffer)
        batches = iter(loader)
        next(batches)
        first = time.perf_counter() - t0
        for n, _ in zip(range(steps - 1), batches):
            pass
        del batches
    mb = 1024
    return {"loader": "ShardStream (previous)", "dataset": dataset, "global_batch_size": args.global_batch,
            "world": args.world, "loader_workers": args.loader_workers, "image_size": args.image_size,
            "shuffle_buffer_samples_per_loader_worker": args.shuffle_buffer,
            "baseline_main_rss_mb": round(baseline_rss / mb), "baseline_main_pss_mb": round(baseline_pss / mb),
            "peak_rss_sum_mb": round(sampler.peak_rss_kb / mb), "peak_pss_sum_mb": round(sampler.peak_pss_kb / mb),
            "peak_pss_over_baseline_mb": round((sampler.peak_pss_kb - baseline_pss) / mb),
            "processes": sampler.processes, "first_batch_s": round(first, 2), "steps": steps,
            "cpu": platform.processor() or platform.machine(), "cores_visible": os.cpu_count(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version()}


if __name__ == "__main__":
    main()
