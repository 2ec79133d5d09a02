"""ImageNet data: the Kaggle ILSVRC layout reader, tar shards, the training order, the loaders, decoding and
transforms.

    layout.py      ImageNetLayout: the Kaggle "ImageNet Object Localization Challenge" files on any fsspec URL
    sample.py      make_sample: a small synthetic dataset in that layout (procedurally drawn shapes)
    shards.py      tar shard writer (with per-sample byte offsets), safe streaming reader, verify_shards
    index.py       the shard folder's _index.json and _meta/ paths: DatasetIndex, read_index, check_index_unchanged,
                   per-shard offsets from the sidecars
    encode.py      what prepare stores per image: original bytes or one baseline RGB JPEG re-encoding (--max-side)
    prepare.py     layout -> shards (the work behind `python -m jobs.prepare`)
    storage.py     the retry policy and fs_and_root for every storage call of the package
    order.py       the training order: a pure function of (index, seed, epoch, G, shuffle budget); its fingerprint
    reader.py      ranged reads of sample runs, the sequential piece reader, iter_raw_samples, read-ahead
    batch.py       raw samples -> batches, crop first (decoded uint8, or bytes + crops for the device), corrupt counts
    options.py     StreamOptions: the loaders' settings in one frozen dataclass
    loader.py      TrainLoader (per rank, persistent loader workers) and eval_loader
    stream.py      ShardStream: the previous per-rank loader, kept only as the baseline the benchmarks compare with
    decode.py      decode_reduced (DCT-scaled JPEG decode), decode_rgb (torchvision, PIL fallback), CorruptImageError
    transforms.py  presets on uint8 tensors; sample_crop / decode_crop (crop drawn from the size), normalize
    gpu_decode.py  device_batch (any loader batch -> normalised on the device); decode_batch: batched nvJPEG there
"""
from data.batch import CorruptDataError
from data.decode import CorruptImageError, decode_pil, decode_reduced, decode_rgb
from data.encode import StoreOptions
from data.gpu_decode import decode_batch, device_batch
from data.index import (DatasetIndex, IndexChangedError, ShardIndexError, ShardInfo, SplitIndex, check_index_unchanged,
                        index_url, read_index, sidecar_url)
from data.layout import Box, ImageNetLayout, LayoutError, Sample, parse_voc_xml
from data.loader import TrainLoader, eval_loader, train_fingerprint, train_order
from data.options import StreamOptions
from data.order import OrderChangedError, TrainOrder, check_same_order, check_world, order_fingerprint
from data.prepare import prepare_dataset
from data.reader import ShardReadError, iter_raw_samples
from data.sample import make_sample
from data.shards import ShardFormatError, ShardIntegrityError, ShardWriter, verify_shards
from data.storage import StorageError, fs_and_root, retry
from data.transforms import (IMAGENET_MEAN, IMAGENET_STD, Crop, build_transform, center_crop, decode_crop,
                             eval_transform, normalize, sample_crop, ten_crop_transform, train_transform)

__all__ = [
    "Box", "CorruptDataError", "CorruptImageError", "Crop", "DatasetIndex", "IMAGENET_MEAN", "IMAGENET_STD",
    "ImageNetLayout", "IndexChangedError", "LayoutError", "OrderChangedError", "Sample", "ShardFormatError",
    "ShardIndexError", "ShardInfo", "ShardIntegrityError", "ShardReadError", "ShardWriter",
    "SplitIndex", "StorageError", "StoreOptions", "StreamOptions", "TrainLoader", "TrainOrder",
    "build_transform", "center_crop", "check_index_unchanged", "check_same_order", "check_world", "decode_batch",
    "decode_crop", "decode_pil", "decode_reduced", "decode_rgb", "device_batch", "eval_loader", "eval_transform",
    "fs_and_root", "index_url", "iter_raw_samples", "make_sample", "normalize", "order_fingerprint", "parse_voc_xml",
    "prepare_dataset", "read_index", "retry", "sample_crop", "sidecar_url", "ten_crop_transform", "train_fingerprint",
    "train_order", "train_transform", "verify_shards",
]
