"""Data pipeline throughput, side by side in one run: images per second per core through the whole loader, from the
same source JPEGs, against the torchvision ImageFolder + PIL baseline; and shard streaming from an S3 API server on
127.0.0.1 against per-file GETs of the same images.

    python -m benchmarks.data_pipeline [--images 200] [--rounds 3] [--max-sides 400,320] [--no-s3] [--json]

Sources (each 500x375, JPEG quality 90, the most common ImageNet size):
- "synthetic": smooth colour fields plus texture, about 100 KB each (ImageNet's mean is ~110 KB);
- "photos": crops of the real photographs scikit-image ships (astronaut, chelsea, coffee, motorcycle left/right,
  rocket; skimage/data), re-encoded; left out with a note when scikit-image is not installed.

Pipelines, each ending in a training batch (RandomResizedCrop 224 + flip):
- baseline: torchvision.datasets.ImageFolder (PIL decode, RandomResizedCrop, flip, ToTensor, Normalize) in a
  DataLoader (batch 25, collate);
- previous_loader: ShardStream (decode_rgb, v2 transforms on the full image), the loop's loader before it moved to
  TrainLoader, on shards `jobs.prepare` wrote without --max-side;
- loader_raw: `data.TrainLoader` as a rank runs it (one rank, global batch 25, loader_workers=0 so that all its work,
  the read-ahead thread included, is this process's CPU time): crop drawn from the image size, decode at the scale
  the crop needs, resize the region (data.batch.CropFirst), on the same raw shards;
- loader_max<N>: the same on shards prepared with `--max-side N`;
- loader_gpu_mode: TrainLoader(decode="gpu") on the raw shards: reading, crop parameters and batching of the
  compressed bytes, what a rank's loader still does per image when the GPU decodes (data.gpu_decode.device_batch).
Also per source set: decode-only rates of PIL (full, and draft at 1/2), torchvision.io.decode_jpeg and simplejpeg
(full, 1/2 DCT scale, fast DCT and upsampling), the measurement behind data/decode.py's choice.
Ours yield uint8 (or bytes) and normalise on the training device (`device_batch`); the baseline normalises on the
CPU, as torchvision's reference does. Rates are per second of this process's CPU time (one thread), i.e. per core, so other load on a
shared machine skews them less than wall time would; rounds alternate between pipelines and the best round of each
is kept. The last line of output is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import simplejpeg
import torch
import torchvision
from PIL import Image

from data.decode import jpeg_header
from data.encode import StoreOptions
from data.index import DatasetIndex, ShardInfo, SplitIndex, sidecar_url, write_index, write_json_atomic
from data.layout import DATA_DIR, SYNSET_MAPPING, TRAIN_SOLUTION
from data.loader import TrainLoader
from data.options import StreamOptions
from data.order import Piece
from data.prepare import prepare_dataset
from data.reader import read_piece
from data.shards import ShardWriter
from data.storage import fs_and_root
from data.stream import ShardStream
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, train_transform

SIZE = (500, 375)  # the most common ImageNet image size
QUALITY = 90
CROP = 224
WNID = "n00000001"
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png", "rocket.jpg")
GPU_GOAL = 5000  # decoded + augmented images/s per GPU the issue asks of an H100/H200-class node
GOAL_RAW, GOAL_PREPARED = 2.0, 4.0  # the goals per core against the baseline: raw images, prepared shards


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: smooth colour fields plus texture, about 100 KB at 500x375 q90 (ImageNet: ~110 KB)."""
    rng = np.random.default_rng(seed)
    out = []
    w, h = SIZE
    for _ in range(n):
        coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        fine = np.asarray(Image.fromarray(rng.uniform(0, 255, (h // 2, w // 2, 3)).astype(np.uint8))
                          .resize((w, h), Image.BILINEAR), dtype=np.float32)
        img = np.clip(0.5 * img + 0.5 * fine + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=QUALITY)
        out.append(buf.getvalue())
    return out


def photo_jpegs(n: int, seed: int = 0) -> list[bytes] | None:
    """Random 4:3 crops of scikit-image's real photos, at least 500 pixels wide where the photo allows (so mostly
    downscaled; chelsea, 451x300, is upscaled), flipped at random, resized to 500x375 and encoded at quality 90;
    None when scikit-image is not installed."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    photos = [Image.open(folder / name).convert("RGB") for name in PHOTOS]
    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        img = photos[i % len(photos)]
        largest = min(img.width / 4, img.height / 3)
        side = rng.uniform(min(largest, SIZE[0] / 4), largest)
        w, h = int(side * 4), int(side * 3)
        left, top = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
        crop = img.crop((left, top, left + w, top + h)).resize(SIZE, Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, "JPEG", quality=QUALITY)
        out.append(buf.getvalue())
    return out


def write_layout(root: Path, jpegs: list[bytes]) -> str:
    """A one-class Kaggle layout (train split only) holding `jpegs`, for `jobs.prepare` and ImageFolder alike."""
    folder = root / DATA_DIR / "train" / WNID
    folder.mkdir(parents=True)
    for i, data in enumerate(jpegs):
        (folder / f"{WNID}_{i}.JPEG").write_bytes(data)
    (root / SYNSET_MAPPING).write_text(f"{WNID} benchmark\n")
    (root / TRAIN_SOLUTION).write_text("ImageId,PredictionString\n")
    return str(root)


def write_shard_dataset(url: str, jpegs: list[bytes], per_shard: int) -> None:
    """A one-class train split of `jpegs` (baseline RGB JPEGs, stored as `jobs.prepare` would store them) written
    straight into shards with offset sidecars and an index: for the GPU check, which has no Kaggle layout."""
    fs, root = fs_and_root(url)
    shards = []
    for n, start in enumerate(range(0, len(jpegs), per_shard)):
        name, buf = f"train/train-{n:06d}.tar", io.BytesIO()
        writer = ShardWriter(buf)
        for i, data in enumerate(jpegs[start:start + per_shard], start):
            header = jpeg_header(data)
            meta = {"key": f"{WNID}_{i}", "width": header.width, "height": header.height}
            writer.write(f"{WNID}_{i}", {"jpg": data, "cls": b"0", "json": json.dumps(meta).encode()})
        nbytes, sha = writer.close()
        fs.makedirs(f"{root}/train", exist_ok=True)
        fs.pipe_file(f"{root}/{name}", buf.getvalue())
        fs.makedirs(sidecar_url(root, name).rpartition("/")[0], exist_ok=True)
        write_json_atomic(fs, sidecar_url(root, name), {"name": name, "samples": writer.samples, "bytes": nbytes,
                                                         "sha256": sha, "offsets": writer.offsets, "end": writer.end})
        shards.append(ShardInfo(name, writer.samples, nbytes, sha))
    write_index(url, DatasetIndex([WNID], ["benchmark"], {"train": SplitIndex(shards, len(jpegs))}))


def _cpu_rate(fn, n: int) -> float:
    """Images per second of this process's CPU time (all its threads)."""
    t = time.process_time()
    got = fn()
    if got != n:
        raise RuntimeError(f"pipeline yielded {got} images, expected {n}")
    return n / (time.process_time() - t)


def _previous(url: str, n: int):
    def run() -> int:
        # Training drops a last partial batch: a batch size dividing n keeps every image in the count.
        stream = ShardStream(url, "train", batch_size=math.gcd(n, 25), train=True, transform=train_transform(CROP),
                             shuffle_buffer=100, image_size=CROP)
        return sum(len(b["key"]) for b in stream)
    return run


def _train_loader(url: str, n: int, decode: str = "cpu"):
    """One pass of a rank's TrainLoader over every image (a new epoch each call: new crops, same cost)."""
    epochs = iter(range(1 << 30))

    def run() -> int:
        opts = StreamOptions(url, image_size=CROP, global_batch_size=math.gcd(n, 25), loader_workers=0,
                             decode=decode)
        return sum(len(b["key"]) for b in TrainLoader(opts, 0, 1).epoch(next(epochs)))
    return run


def pipelines(workdir: Path, jpegs: list[bytes], max_sides: list[int]) -> dict:
    """Name -> zero-argument function that runs the pipeline over every image once and returns the count."""
    src = write_layout(workdir / "raw", jpegs)
    quiet = dict(shard_size=100, splits=["train"], log=lambda m: None)
    prepare_dataset(src, str(workdir / "shards"), **quiet)
    for side in max_sides:
        prepare_dataset(src, str(workdir / f"shards{side}"), options=StoreOptions(max_side=side), **quiet)
    T = torchvision.transforms
    folder = torchvision.datasets.ImageFolder(f"{src}/{DATA_DIR}/train", transform=T.Compose([
        T.RandomResizedCrop(CROP), T.RandomHorizontalFlip(), T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
    baseline = torch.utils.data.DataLoader(folder, batch_size=25, shuffle=True, num_workers=0)
    n, raw = len(jpegs), str(workdir / "shards")
    runs = {"baseline": lambda: sum(len(labels) for _, labels in baseline),
            "previous_loader": _previous(raw, n), "loader_raw": _train_loader(raw, n)}
    for side in max_sides:
        runs[f"loader_max{side}"] = _train_loader(str(workdir / f"shards{side}"), n)
    runs["loader_gpu_mode"] = _train_loader(raw, n, decode="gpu")
    return runs


def bench_set(jpegs: list[bytes], rounds: int, max_sides: list[int]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        runs = pipelines(Path(tmp), jpegs, max_sides)
        n = len(jpegs)
        for fn in runs.values():
            fn()  # warm-up: first-call allocations, lazy imports, page cache
        best = {k: 0.0 for k in runs}
        for _ in range(rounds):
            for k, fn in runs.items():
                best[k] = max(best[k], _cpu_rate(fn, n))
        sizes = {side: _mean_kb(Path(tmp) / f"shards{side}") for side in max_sides}
    out = {"mean_source_kb": round(sum(map(len, jpegs)) / n / 1024, 1),
           **{f"mean_stored_kb_max{side}": kb for side, kb in sizes.items()}}
    for k, rate in best.items():
        out[f"{k}_images_per_s"] = round(rate, 1)
        out[f"{k}_cpu_ms_per_image"] = round(1000 / rate, 3)
        out[f"{k}_vs_baseline"] = round(rate / best["baseline"], 2)
        out[f"{k}_cores_for_{GPU_GOAL}_per_s"] = round(GPU_GOAL / rate, 2)
    out["goals_vs_baseline"] = {"loader_raw": GOAL_RAW, **{f"loader_max{side}": GOAL_PREPARED for side in max_sides}}
    return out


def _mean_kb(root: Path) -> float:
    tars = list(root.glob("train/*.tar"))
    index = json.loads((root / "_index.json").read_text())
    return round(sum(p.stat().st_size for p in tars) / index["splits"]["train"]["samples"] / 1024, 1)


def bench_decoders(jpegs: list[bytes], rounds: int) -> dict:
    """Decode only (to an RGB array), per core: the measurement behind data/decode.py's choice of simplejpeg."""
    from torchvision.io import decode_jpeg

    def pil(data: bytes, reduce: int = 1):
        img = Image.open(io.BytesIO(data))
        if reduce > 1:
            img.draft("RGB", (img.width // reduce, img.height // reduce))
        return np.asarray(img.convert("RGB"))

    w, h = SIZE
    decoders = {"pil": pil, "pil_draft_half": lambda d: pil(d, 2),
                "torchvision": lambda d: decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8)),
                "simplejpeg": lambda d: simplejpeg.decode_jpeg(d, "RGB"),
                "simplejpeg_half": lambda d: simplejpeg.decode_jpeg(d, "RGB", min_width=w // 2, min_height=h // 2),
                "simplejpeg_fastdct": lambda d: simplejpeg.decode_jpeg(d, "RGB", fastdct=True, fastupsample=True)}
    best = {k: 0.0 for k in decoders}
    for _ in range(rounds + 1):  # the first round warms up
        for k, fn in decoders.items():
            t = time.process_time()
            for data in jpegs:
                fn(data)
            best[k] = max(best[k], len(jpegs) / (time.process_time() - t))
    return {f"decode_{k}_images_per_s": round(v, 1) for k, v in best.items()}


def bench_s3(jpegs: list[bytes], rounds: int) -> dict:
    """Per-file GETs against shard streaming of the same images from a moto S3 server on 127.0.0.1 (wall time)."""
    import fsspec
    import s3fs

    from tests.conftest import s3_environment

    with s3_environment(), tempfile.TemporaryDirectory() as tmp:
        s3fs.S3FileSystem.clear_instance_cache()
        fs = fsspec.filesystem("s3")
        fs.mkdir("bench")
        fs.pipe({f"bench/files/img{i:05d}.JPEG": d for i, d in enumerate(jpegs)})
        prepare_dataset(write_layout(Path(tmp) / "raw", jpegs), "s3://bench/shards", shard_size=100,
                        splits=["train"], log=lambda m: None)
        n = len(jpegs)
        index = json.loads(fs.cat_file("bench/shards/_index.json"))
        pieces = [Piece(s["name"], s["bytes"], 0, s["samples"]) for s in index["splits"]["train"]["shards"]]

        def per_file():
            for i in range(n):
                fs.cat_file(f"bench/files/img{i:05d}.JPEG")

        def streamed():
            got = sum(1 for p in pieces for _ in read_piece(fs, "bench/shards", "s3://bench/shards", p))
            assert got == n

        best = {"s3_per_file_get": 0.0, "s3_shard_stream_raw": 0.0}
        for _ in range(rounds):
            for k, fn in (("s3_per_file_get", per_file), ("s3_shard_stream_raw", streamed)):
                t = time.perf_counter()
                fn()
                best[k] = max(best[k], n / (time.perf_counter() - t))
        result = {f"{k}_images_per_s": round(v, 1) for k, v in best.items()}
        result["s3_stream_speedup"] = round(best["s3_shard_stream_raw"] / best["s3_per_file_get"], 1)
        return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=200, help="images per source set")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per pipeline; the best is kept")
    p.add_argument("--max-sides", default="400,320", help="comma-separated --max-side values to prepare shards at")
    p.add_argument("--no-s3", action="store_true", help="skip the S3 streaming comparison")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    max_sides = [int(s) for s in args.max_sides.split(",") if s.strip()]
    t0, load_start = time.perf_counter(), os.getloadavg()[0]
    sets = {"synthetic": make_jpegs(args.images), "photos": photo_jpegs(args.images)}
    result: dict = {"images": args.images, "image_size": list(SIZE), "jpeg_quality": QUALITY, "crop": CROP}
    for name, jpegs in sets.items():
        result[name] = ({**bench_set(jpegs, args.rounds, max_sides), **bench_decoders(jpegs, args.rounds)} if jpegs
                        else "skipped: scikit-image not installed")
    if not args.no_s3:
        result.update(bench_s3(sets["synthetic"], args.rounds))
    result.update({"seconds": round(time.perf_counter() - t0, 1), "threads": 1, "cpu": _cpu_name(),
                   "cores_visible": os.cpu_count(), "load_average_1m_start": round(load_start, 1),
                   "load_average_1m_end": round(os.getloadavg()[0], 1),
                   "python": platform.python_version(), "torch": torch.__version__,
                   "torchvision": torchvision.__version__, "pillow": Image.__version__,
                   "simplejpeg": simplejpeg.__version__, "gpu": "not measured (no GPU on this machine)"})
    if not args.json:
        for k, v in result.items():
            print(f"{k:45s} {v}")
    print(json.dumps(result))
    return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
