"""TrainLoader with `decode="gpu"`, end to end on a CPU-only machine: loader workers batch compressed bytes and crops,
`device_batch` decodes them with the CPU stand-in for nvJPEG (device="cpu"). Its batches must be the CPU path's in
shapes, order, keys, labels and (within resize rounding) values, with the same shape independence, exact resume and
corrupt-image accounting."""
import collections

import pytest
import torch

from data.batch import CorruptDataError, join_batches
from data.gpu_decode import device_batch
from data.loader import TrainLoader, eval_loader
from data.options import StreamOptions
from data.transforms import IMAGENET_STD, normalize
from tests.shard_data import build
from tests.test_data_loader import dataset, epoch_keys, options  # noqa: F401 (dataset: the shards fixture)

LEVEL = 1 / (255 * min(IMAGENET_STD))  # one uint8 step after normalisation (test_data_gpu_decode)


def steps(url: str, world: int, loader_workers: int, decode: str, epoch: int = 1, start: int = 0,
          stop: int | None = None, to_device: bool = True, **kw) -> list[dict]:
    """Per step, the ranks' batches joined in rank order; through device_batch(device="cpu") when `to_device`."""
    loaders = [TrainLoader(options(url, loader_workers, decode=decode, **kw), r, world) for r in range(world)]
    passes = [ld.epoch(epoch, start) for ld in loaders]
    out = []
    try:
        for _ in range(start, stop if stop is not None else loaders[0].steps_per_epoch):
            parts = [next(p) for p in passes]
            if to_device:
                parts = [device_batch(b, "cpu", 8) for b in parts]
                out.append({"key": [k for b in parts for k in b["key"]], "image": torch.cat([b["image"] for b in parts]),
                            "label": torch.cat([b["label"] for b in parts]),
                            "position": torch.cat([b["position"] for b in parts]),
                            "corrupt": [k for b in parts for k in b["corrupt"]]})
            else:
                out.append(join_batches(parts))
    finally:
        for ld in loaders:
            ld.close()
    return out


@pytest.fixture(scope="module")
def encoded(dataset):
    """Epoch 1, gpu mode, one rank in-process, before the device: bytes, offsets and crops."""
    return steps(dataset, 1, 0, "gpu", to_device=False)


def same_encoded(a: list[dict], b: list[dict]) -> bool:
    fields = ("image", "image_offsets", "crop", "label", "position")
    return len(a) == len(b) and all(x["key"] == y["key"] and all(torch.equal(x[f], y[f]) for f in fields)
                                    for x, y in zip(a, b))


def test_gpu_mode_matches_the_cpu_path(dataset):
    cpu = steps(dataset, 1, 0, "cpu")
    gpu = steps(dataset, 2, 2, "gpu")
    assert len(gpu) == len(cpu) == 16
    for c, g in zip(cpu, gpu):
        assert g["key"] == c["key"] and torch.equal(g["label"], c["label"]) and torch.equal(g["position"],
                                                                                            c["position"])
        assert g["image"].shape == c["image"].shape == (6, 3, 8, 8) and g["image"].dtype == torch.float32
        assert (g["image"] - c["image"]).abs().max() <= LEVEL * 1.01  # the same crop; resize rounding only


def test_gpu_mode_batches_carry_bytes_and_crops(encoded):
    first = encoded[0]
    offsets, crops = first["image_offsets"], first["crop"]
    assert first["image"].dtype == torch.uint8 and first["image"].dim() == 1
    assert offsets.tolist()[0] == 0 and offsets.tolist()[-1] == first["image"].numel() and len(offsets) == 7
    assert all(bytes(first["image"][a:b].numpy()[:2]) == b"\xff\xd8" for a, b in zip(offsets[:-1], offsets[1:]))
    assert crops.shape == (6, 5) and (crops[:, 2:4] > 0).all() and set(crops[:, 4].tolist()) <= {0, 1}


@pytest.mark.parametrize("world, loader_workers", [(3, 2), (6, 1)])
def test_gpu_mode_batches_do_not_depend_on_ranks_or_loader_workers(dataset, encoded, world, loader_workers):
    assert same_encoded(steps(dataset, world, loader_workers, "gpu", to_device=False), encoded)


def test_gpu_mode_resumes_exactly_at_another_shape(dataset, encoded):
    first = steps(dataset, 2, 1, "gpu", stop=7, to_device=False)
    rest = steps(dataset, 1, 2, "gpu", start=7, to_device=False)
    assert collections.Counter(k for b in first + rest for k in b["key"]) == collections.Counter(
        epoch_keys(dataset, 1))
    assert same_encoded(first + rest, encoded)


def test_gpu_mode_corrupt_images_are_dropped_and_counted(tmp_path):
    url = str(tmp_path)
    build(url, [20, 20], corrupt={3}, truncated={15, 22}, sidecars=True)  # 3: no size; 15, 22: fail to decode
    out = steps(url, 2, 1, "gpu", epoch=0, max_corrupt_fraction=0.5)
    corrupt = sorted(k for b in out for k in b["corrupt"])
    assert corrupt == ["s0003", "s0015", "s0022"]
    assert sorted(k for b in out for k in b["key"] + b["corrupt"]) == sorted(epoch_keys(url, 0))
    for b in out:  # labels, keys, positions and images stay aligned
        assert b["image"].shape[0] == len(b["key"]) == len(b["label"]) == len(b["position"])
        assert b["label"].tolist() == [int(k[1:]) % 5 for k in b["key"]]
    build(str(tmp_path / "bad"), [60], truncated=set(range(0, 60, 5)), sidecars=True)
    with pytest.raises(CorruptDataError, match=r"of \d+ images of .*rank 0.* were corrupt.*s00\d\d \(.*truncated"):
        steps(str(tmp_path / "bad"), 1, 0, "gpu", epoch=0)


def test_device_batch_normalises_a_cpu_batch_on_the_device(dataset):
    loader = TrainLoader(options(dataset), 0, 1)
    batch = next(loader.epoch(0))
    out = device_batch(batch, "cpu", 8, channels_last=True)
    assert out["key"] == batch["key"] and torch.equal(out["label"], batch["label"])
    assert torch.equal(out["image"], normalize(batch["image"], channels_last=True))
    assert out["image"].is_contiguous(memory_format=torch.channels_last)


def test_eval_loader_gpu_mode_matches_its_cpu_mode(tmp_path):
    url = str(tmp_path)
    build(url, [7, 6], split="val", sidecars=True)
    cpu = [device_batch(b, "cpu", 8) for b in eval_loader(StreamOptions(url, image_size=8, eval_batch_size=4,
                                                                        loader_workers=0), 0, 1)]
    gpu = [device_batch(b, "cpu", 8) for b in eval_loader(StreamOptions(url, image_size=8, eval_batch_size=4,
                                                                        loader_workers=2, decode="gpu"), 0, 1)]
    assert [b["key"] for b in gpu] == [b["key"] for b in cpu] and [len(b["key"]) for b in cpu] == [4, 4, 4, 1]
    assert all((g["image"] - c["image"]).abs().max() <= LEVEL * 1.01 for g, c in zip(gpu, cpu))


def test_gpu_mode_refuses_auto_augment(dataset):
    with pytest.raises(ValueError, match="auto_augment='randaugment' needs decode='cpu'"):
        StreamOptions(dataset, decode="gpu", auto_augment="randaugment")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_mode_on_cuda_matches_the_cpu_path(dataset):
    loader = TrainLoader(options(dataset, decode="gpu"), 0, 1)
    reference = steps(dataset, 1, 0, "cpu", stop=4)
    for batch, c in zip(loader.epoch(1), reference):
        g = device_batch(batch, "cuda", 8)
        assert g["image"].is_cuda and g["label"].is_cuda and g["key"] == c["key"]
        assert (g["image"].cpu() - c["image"]).abs().mean() < 2 * LEVEL  # nvJPEG's IDCT differs by a step or two
    loader.close()


def test_the_config_key_reaches_the_loader_options(dataset):
    from distributed.config import ConfigError, load_config

    cfg = load_config(None, [f"data.url={dataset}", "data.decode=gpu"])
    assert StreamOptions.from_config(cfg.data, seed=0).decode == "gpu"
    with pytest.raises(ConfigError, match="'data.auto_augment' .* needs data.decode 'cpu'"):
        load_config(None, ["data.decode=gpu", "data.auto_augment=trivialaugment"])


def test_the_gpu_check_drives_the_gpu_mode(dataset):
    """benchmarks.gpu_adapters: the device check's input part, here with the CPU stand-in for the device."""
    from benchmarks import gpu_adapters as adapt

    cpu = adapt.train_loader(dataset, batch=6, image_size=8, workers=0, epoch=2, decode="cpu")
    gpu = adapt.train_loader(dataset, batch=6, image_size=8, workers=1, epoch=2, decode="gpu")
    for _, c, g in zip(range(3), cpu, gpu):
        assert "crop" in g and g["key"] == c["key"]
        images, labels = adapt.to_device(g, torch.device("cpu"), True, 8)
        reference, _ = adapt.to_device(c, torch.device("cpu"), True)
        assert images.shape == (6, 3, 8, 8) and images.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(labels, c["label"]) and (images - reference).abs().max() <= LEVEL * 1.01
    cpu.close()
    gpu.close()
    assert adapt.gpu_decode_status()["path"].startswith("TrainLoader(decode='gpu')")
