"""ImageNet data: the Kaggle ILSVRC layout reader, tar shards, the training order, the loaders, decoding and
transforms.

    layout.py      ImageNetLayout: the Kaggle "ImageNet Object Localization Challenge" files on any fsspec URL
    sample.py      make_sample: a small synthetic dataset in that layout (procedurally drawn shapes)
    shards.py      tar shard writer (with per-sample byte offsets), safe streaming reader, verify_shards
    index.py       index.json: DatasetIndex, read_index; per-shard offsets from the sidecars
    prepare.py     layout -> shards (the work behind `python -m jobs.prepare`)
    storage.py     the retry policy and fs_and_root for every storage call of the package
    order.py       the training order: a pure function of (index, seed, epoch, G, shuffle budget); its fingerprint
    reader.py      ranged reads of sample runs, the sequential piece reader, iter_raw_samples, read-ahead
    batch.py       raw samples -> uint8 batches: decode, seeded augmentation, corrupt-image accounting
    options.py     StreamOptions: the loaders' settings in one frozen dataclass
    loader.py      TrainLoader (per rank, persistent loader workers) and eval_loader
    stream.py      ShardStream / build_loader: evaluation, and the previous per-rank training order
    decode.py      decode_rgb: torchvision first, PIL fallback, CorruptImageError
    transforms.py  training / evaluation presets on uint8 tensors, normalize
"""
from data.batch import CorruptDataError
from data.decode import CorruptImageError, decode_pil, decode_rgb
from data.index import DatasetIndex, ShardIndexError, ShardInfo, SplitIndex, read_index
from data.layout import Box, ImageNetLayout, LayoutError, Sample, parse_voc_xml
from data.loader import TrainLoader, eval_loader, train_fingerprint, train_order
from data.options import StreamOptions
from data.order import OrderChangedError, TrainOrder, check_same_order, check_world, order_fingerprint
from data.prepare import prepare_dataset
from data.reader import ShardReadError, iter_raw_samples
from data.sample import make_sample
from data.shards import ShardFormatError, ShardIntegrityError, ShardWriter, verify_shards
from data.storage import StorageError, fs_and_root, retry
from data.stream import ShardStream, build_loader
from data.transforms import (IMAGENET_MEAN, IMAGENET_STD, build_transform, eval_transform, normalize,
                             train_transform)

__all__ = [
    "Box", "CorruptDataError", "CorruptImageError", "DatasetIndex", "IMAGENET_MEAN", "IMAGENET_STD",
    "ImageNetLayout", "LayoutError", "OrderChangedError", "Sample", "ShardFormatError", "ShardIndexError",
    "ShardInfo", "ShardIntegrityError", "ShardReadError", "ShardStream", "ShardWriter", "SplitIndex",
    "StorageError", "StreamOptions", "TrainLoader", "TrainOrder", "build_loader", "build_transform",
    "check_same_order", "check_world", "decode_pil", "decode_rgb", "eval_loader", "eval_transform", "fs_and_root",
    "iter_raw_samples", "make_sample", "normalize", "order_fingerprint", "parse_voc_xml", "prepare_dataset",
    "read_index", "retry", "train_fingerprint", "train_order", "train_transform", "verify_shards",
]
