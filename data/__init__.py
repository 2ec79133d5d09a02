"""ImageNet data: the Kaggle ILSVRC layout reader, tar shards, the streaming loader, decoding and transforms.

    layout.py      ImageNetLayout: the Kaggle "ImageNet Object Localization Challenge" files on any fsspec URL
    sample.py      make_sample: a small synthetic dataset in that layout (procedurally drawn shapes)
    shards.py      tar shard writer, safe streaming reader, verify_shards
    index.py       the shard folder's _index.json and _meta/ paths: DatasetIndex, read_index, check_index_unchanged
    encode.py      what prepare stores per image: original bytes or one baseline RGB JPEG re-encoding (--max-side)
    prepare.py     layout -> shards (the work behind `python -m jobs.prepare`)
    stream.py      ShardStream / build_loader: exact, resumable, rank- and worker-partitioned streaming
    decode.py      decode_reduced (DCT-scaled JPEG decode), decode_rgb (torchvision, PIL fallback), CorruptImageError
    transforms.py  presets on uint8 tensors; sample_crop / decode_crop (crop drawn from the size), normalize
    gpu_decode.py  decode_batch: batched nvJPEG decode, crop, resize, flip, normalise on the device

Names are loaded on first use, so `import data.layout` or `data.make_sample` does not import torch.
"""
from __future__ import annotations

import importlib

_API = {
    "build_loader": "stream", "ShardStream": "stream", "CorruptDataError": "stream", "ShardReadError": "stream",
    "read_index": "index", "DatasetIndex": "index", "SplitIndex": "index", "ShardInfo": "index",
    "ShardIndexError": "index", "IndexChangedError": "index", "check_index_unchanged": "index",
    "index_url": "index", "sidecar_url": "index",
    "verify_shards": "shards", "ShardFormatError": "shards", "ShardIntegrityError": "shards",
    "ShardWriter": "shards",
    "prepare_dataset": "prepare", "StoreOptions": "encode",
    "ImageNetLayout": "layout", "LayoutError": "layout", "Sample": "layout", "Box": "layout",
    "parse_voc_xml": "layout",
    "make_sample": "sample",
    "decode_rgb": "decode", "decode_pil": "decode", "decode_reduced": "decode", "CorruptImageError": "decode",
    "train_transform": "transforms", "eval_transform": "transforms", "build_transform": "transforms",
    "normalize": "transforms", "IMAGENET_MEAN": "transforms", "IMAGENET_STD": "transforms",
    "Crop": "transforms", "sample_crop": "transforms", "center_crop": "transforms", "decode_crop": "transforms",
    "decode_batch": "gpu_decode",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f"data.{_API[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
