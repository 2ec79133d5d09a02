"""Decode, crop, resize, flip and normalise a batch of JPEGs on the training device in one batched decode call.

With `data.decode: gpu` the loader workers only read and batch compressed bytes and each sample's `Crop`
(data.batch.CropFirst: sample_crop / center_crop drawn from the sample's size with the generator seeded per sample,
as the CPU path draws it, so the order, the crops and exact resume are the CPU path's); the training process calls
`device_batch`, which hands them to `decode_batch`. The decoder is torchvision's batched nvJPEG
(`torchvision.io.decode_jpeg(list, device="cuda")`), already a dependency and on the same CUDA stream as the model;
NVIDIA DALI's mixed decoder (hardware JPEG decoder, ROI decoding) is the alternative to measure on a GPU node
(docs/data_pipeline.md says why it is not the default). Samples nvJPEG cannot take (CMYK, PNG, arithmetic or
lossless JPEG) and samples it fails on are decoded on the CPU (data.decode) without stopping the batch; samples no
decoder can read are left out and reported. With device="cpu" the same function runs with libjpeg-turbo standing in
for nvJPEG (torchvision's CPU decode_jpeg on the same list), which is how CPU-only machines and CI test this path.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as nnf
from torchvision.io import ImageReadMode, decode_jpeg

from data.decode import CorruptImageError, decode_rgb, jpeg_header
from data.transforms import Crop, normalization_constants, normalize

Encoded = bytes | bytearray | memoryview | torch.Tensor


class DecodedBatch(NamedTuple):
    images: torch.Tensor  # float32 [k, 3, size, size] on the device, normalised; k = len(data) - len(corrupt)
    kept: list[int]  # positions (in the input) of the images, in order
    corrupt: list[tuple[int, str]]  # (position, reason) of samples no decoder could read


def _as_cpu_uint8(item: Encoded) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        if item.dtype != torch.uint8 or item.dim() != 1:
            raise TypeError(f"encoded images must be 1-D uint8 tensors, got {item.dtype} {tuple(item.shape)}")
        return item.cpu()
    return torch.frombuffer(bytearray(item), dtype=torch.uint8)


def _to_bytes(item: Encoded) -> bytes:
    return item.cpu().numpy().tobytes() if isinstance(item, torch.Tensor) else bytes(item)


def _decode_on_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Batched decode; when the batch call fails (one bad image fails it), one at a time, None for failures."""
    if not tensors:
        return []
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                out.append(None)
        return out


def decode_images(data: Sequence[Encoded], device: torch.device | str,
                  keys: Sequence[str] | None = None) -> list[torch.Tensor | CorruptImageError]:
    """uint8 [3, H, W] images on `device` (decoded there when it can) or the CorruptImageError of each sample."""
    device = torch.device(device)
    keys = list(keys) if keys is not None else [str(i) for i in range(len(data))]
    tensors = [_as_cpu_uint8(d) for d in data]
    fast = [i for i, t in enumerate(tensors) if (h := jpeg_header(t.numpy())) is not None and h.fast_path]
    out: list = [None] * len(data)
    for i, image in zip(fast, _decode_on_device([tensors[i] for i in fast], device)):
        out[i] = image
    for i in range(len(data)):
        if out[i] is None:  # not for nvJPEG, or it failed: the CPU decoders, then the device
            try:
                out[i] = decode_rgb(_to_bytes(data[i]), keys[i]).to(device, non_blocking=True)
            except CorruptImageError as e:
                out[i] = e
    return out


def _resized(image: torch.Tensor, crop: Crop, size: int) -> torch.Tensor:
    """float32 [3, size, size] of the crop (bilinear, antialiased: RandomResizedCrop's resize), mirrored if asked."""
    region = image[:, crop.top:crop.top + crop.height, crop.left:crop.left + crop.width]
    out = nnf.interpolate(region.unsqueeze(0).float(), size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)[0]
    return out.flip(-1) if crop.flip else out


def decode_batch(data: Sequence[Encoded], crops: Sequence[Crop], size: int, device: torch.device | str = "cuda",
                 keys: Sequence[str] | None = None, channels_last: bool = False) -> DecodedBatch:
    """Decode a batch on `device`, cut each sample's crop, resize to size x size, flip, normalise (ImageNet mean/std).

    `crops` are in each image's full-size pixels (as data.transforms.decode_crop takes them). Returns the float
    batch in input order without the samples no decoder could read (listed in `corrupt`, their positions in `kept`
    are skipped)."""
    if len(crops) != len(data):
        raise ValueError(f"{len(data)} images but {len(crops)} crops; pass one Crop per image")
    device = torch.device(device)
    decoded = decode_images(data, device, keys)
    kept = [i for i, d in enumerate(decoded) if isinstance(d, torch.Tensor)]
    corrupt = [(i, d.reason) for i, d in enumerate(decoded) if not isinstance(d, torch.Tensor)]
    images = torch.empty((len(kept), 3, size, size), dtype=torch.float32, device=device)
    for row, i in enumerate(kept):
        images[row] = _resized(decoded[i], crops[i], size)
    mean, inv_std = normalization_constants(device)
    images.round_().clamp_(0, 255).sub_(mean).mul_(inv_std)  # round: the uint8 CPU path's pixel values
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return DecodedBatch(images, kept, corrupt)


def encoded_images(batch: dict) -> list[torch.Tensor]:
    """The compressed images of an encoded-mode batch (data/batch.py) as 1-D uint8 views of its "image" bytes."""
    offsets = batch["image_offsets"].tolist()
    return [batch["image"][start:stop] for start, stop in zip(offsets, offsets[1:])]


def device_batch(batch: dict, device: torch.device | str, image_size: int, channels_last: bool = False) -> dict:
    """A loader batch (TrainLoader or eval_loader, either decode mode) as the training step takes it: float32
    normalised "image" [k, 3, S, S] and int64 "label" [k] on `device`; the loop calls this one function whatever
    `data.decode` says.

    CPU-decoded batches (uint8 images) are copied as uint8 and normalised on the device (`image_size` unused).
    Encoded batches (`decode: gpu`) are decoded there with each sample's crop (`decode_batch`, image_size x
    image_size). Samples no decoder reads are dropped with their labels, keys and positions, added to "corrupt",
    and counted against max_corrupt_fraction through the batch's "corrupt_tally" (TrainLoader's batches carry one).
    """
    device = torch.device(device)
    if "crop" not in batch:
        return {**batch, "image": normalize(batch["image"], device, channels_last),
                "label": batch["label"].to(device, non_blocking=True)}
    keys = batch["key"]
    crops = [Crop(top, left, height, width, bool(flip)) for top, left, height, width, flip in batch["crop"].tolist()]
    out = decode_batch(encoded_images(batch), crops, image_size, device, keys, channels_last)
    failed = [keys[i] for i, _ in out.corrupt]
    tally = batch.get("corrupt_tally")
    if tally is not None:
        tally.add(0, len(failed), [f"{keys[i]} ({reason})" for i, reason in out.corrupt])
    kept = torch.tensor(out.kept, dtype=torch.int64)
    result = {k: v for k, v in batch.items() if k not in ("image_offsets", "crop", "corrupt_tally")}
    result.update(image=out.images, label=batch["label"][kept].to(device, non_blocking=True),
                  key=[keys[i] for i in out.kept], corrupt=batch["corrupt"] + failed)
    if "position" in batch:
        result["position"] = batch["position"][kept]
    return result
