"""Shard folders read with other WebDataset clients as they are: `webdataset.WebDataset` on the shard URLs the index
lists, and `ray.data.read_webdataset` on the folder URL (which skips `_index.json` and `_meta/`). Every image decodes
to the same RGB layout (prepare converted the CMYK, grayscale and PNG samples) and carries the index's label."""
import collections

import numpy as np
import pytest

from data.index import read_index
from data.layout import ImageNetLayout
from data.prepare import prepare_dataset
from data.sample import make_sample


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("portable")
    report = make_sample(str(root / "raw"), classes=3, per_class=8, val_per_class=3, test=3, seed=4)
    prepare_dataset(str(root / "raw"), str(root / "shards"), shard_size=5, log=lambda m: None)
    layout = ImageNetLayout(str(root / "raw"))
    labels = {s.key: s.label for split in ("train", "val", "test") for s in layout.samples(split)}
    return str(root / "shards"), labels, report


def _check_sample(key: str, image: np.ndarray, label, meta: dict, classes: list[str], labels: dict) -> None:
    assert image.dtype == np.uint8 and image.shape == (meta["height"], meta["width"], 3)
    if labels[key] < 0:
        assert label is None  # test split: no label member
    else:
        assert int(label) == labels[key] == classes.index(meta["wnid"])


def test_webdataset_reads_every_split(folder):
    import webdataset as wds

    url, labels, report = folder
    index = read_index(url)
    for split, info in index.splits.items():
        shards = [f"{url}/{s.name}" for s in info.shards]
        ds = wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("rgb8")
        seen = []
        for sample in ds:
            _check_sample(sample["__key__"], sample["jpg"], sample.get("cls"), sample["json"], index.classes, labels)
            seen.append(sample["__key__"])
        assert len(seen) == len(set(seen)) == info.samples
    converted = {report["special"][k] for k in ("cmyk", "grayscale", "png_as_jpeg")}
    assert converted <= set(labels)


@pytest.mark.slow
def test_ray_data_reads_the_folder_url_as_it_is(folder, ray_local):
    import ray

    url, labels, _ = folder
    index = read_index(url)
    rows = ray.data.read_webdataset(url).take_all()
    per_split = collections.Counter(row["__url__"].rsplit("/", 2)[-2] for row in rows)
    assert per_split == {split: info.samples for split, info in index.splits.items()}
    for row in rows:
        _check_sample(row["__key__"], row["jpg"], row["cls"], row["json"], index.classes, labels)
