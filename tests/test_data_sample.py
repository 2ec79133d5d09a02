"""The synthetic Kaggle-layout dataset: deterministic, learnable by shape only, with ImageNet's odd files."""
import io
import uuid

import fsspec
import numpy as np
import pytest
from PIL import Image

from data.decode import CorruptImageError, inspect_image
from data.layout import ImageNetLayout
from data.sample import OBJECT_SCALE, SHAPES, SIZE_RANGE, make_sample


def _files(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    return {p[len(root):]: fs.cat_file(p) for p in fs.find(root)}


@pytest.fixture
def mem():
    urls = []

    def new() -> str:
        urls.append(f"memory://sample-{uuid.uuid4().hex[:8]}")
        return urls[-1]

    yield new
    fs = fsspec.filesystem("memory")
    for u in urls:
        if fs.exists(u):
            fs.rm(u, recursive=True)


def test_byte_identical_for_a_seed(mem):
    a, b, c = mem(), mem(), mem()
    kw = dict(classes=4, per_class=3, val_per_class=2, test=2)
    make_sample(a, seed=7, **kw), make_sample(b, seed=7, **kw), make_sample(c, seed=8, **kw)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert fa.keys() == fc.keys() and fa != fc


def test_layout_files_specials_and_boxes(mem):
    url = mem()
    report = make_sample(url, classes=len(SHAPES), per_class=3, val_per_class=2, test=3)
    files = _files(url)
    for name in ("/LOC_synset_mapping.txt", "/LOC_train_solution.csv", "/LOC_val_solution.csv",
                 "/LOC_sample_submission.csv", "/ILSVRC/ImageSets/CLS-LOC/train_cls.txt",
                 "/ILSVRC/ImageSets/CLS-LOC/train_loc.txt", "/ILSVRC/ImageSets/CLS-LOC/val.txt",
                 "/ILSVRC/ImageSets/CLS-LOC/test.txt"):
        assert files[name], name
    layout = ImageNetLayout(url)
    assert layout.class_names == list(SHAPES) and layout.classes == sorted(layout.classes)
    assert layout.classes[0] == "n00000001"
    train = {s.key: s for s in layout.samples("train")}
    special = report["special"]
    assert inspect_image(layout.read_bytes(train[special["cmyk"]]))[2:] == ("JPEG", "CMYK")
    assert inspect_image(layout.read_bytes(train[special["grayscale"]]))[2:] == ("JPEG", "L")
    assert inspect_image(layout.read_bytes(train[special["png_as_jpeg"]]))[2] == "PNG"
    assert train[special["png_as_jpeg"]].path.endswith(".JPEG")
    with pytest.raises(CorruptImageError):
        inspect_image(layout.read_bytes(train[special["truncated"]]))
    assert len(set(special.values())) == 4

    sizes = set()
    for split in ("train", "val"):
        for s in layout.samples(split):
            if s.key == special["truncated"]:
                continue
            w, h, _, _ = inspect_image(layout.read_bytes(s))
            sizes.add((w, h))
            assert SIZE_RANGE[0] <= w <= SIZE_RANGE[1] and SIZE_RANGE[0] <= h <= SIZE_RANGE[1]
            for b in s.boxes:
                assert 0 <= b.xmin < b.xmax < w and 0 <= b.ymin < b.ymax < h
                extent = max(b.xmax - b.xmin, b.ymax - b.ymin) + 1
                assert 0.5 * OBJECT_SCALE[0] * min(w, h) <= extent <= OBJECT_SCALE[1] * min(w, h) + 2
    assert len(sizes) > 10 and any(w != h for w, h in sizes)


def test_mean_colour_does_not_predict_the_class(mem):
    """A nearest-centroid classifier on mean RGB must be near chance: colour is independent of class."""
    url = mem()
    make_sample(url, classes=5, per_class=40, val_per_class=1, test=0, seed=3)
    layout = ImageNetLayout(url)
    feats, labels, number = [], [], []
    for s in layout.samples("train"):
        try:
            img = np.asarray(Image.open(io.BytesIO(layout.read_bytes(s))).convert("RGB"), dtype=np.float32)
        except OSError:
            continue  # the truncated special
        feats.append(img.reshape(-1, 3).mean(0))
        labels.append(s.label)
        number.append(int(s.key.split("_")[1]))
    feats, labels, fit = np.array(feats), np.array(labels), np.array(number) % 2 == 0
    centroids = np.stack([feats[fit & (labels == c)].mean(0) for c in range(5)])
    pred = np.argmin(((feats[~fit, None] - centroids[None]) ** 2).sum(-1), 1)
    accuracy = float((pred == labels[~fit]).mean())
    print(f"mean-colour nearest-centroid accuracy {accuracy:.3f} (chance 0.2)")
    assert accuracy < 0.4, accuracy


def test_argument_errors(mem):
    with pytest.raises(ValueError, match="classes=13"):
        make_sample(mem(), classes=13)
    with pytest.raises(ValueError, match="room for the special files"):
        make_sample(mem(), classes=2, per_class=2)
