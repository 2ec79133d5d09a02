"""The Kaggle ILSVRC layout reader: local, file://, memory:// and a real S3 API; every malformed input."""
import uuid

import fsspec
import pytest

from data.layout import (SYNSET_MAPPING, TRAIN_SOLUTION, VAL_SOLUTION, Box, ImageNetLayout, LayoutError,
                         clip_boxes, parse_solution_csv, parse_synset_mapping, parse_voc_xml)
from data.sample import make_sample

TINY = dict(classes=3, per_class=6, val_per_class=2, test=2, seed=1)


@pytest.fixture(scope="module")
def tiny_local(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout") / "raw"
    report = make_sample(str(root), **TINY)
    return str(root), report


@pytest.fixture
def memory_copy():
    url = f"memory://layout-{uuid.uuid4().hex[:8]}"
    yield url, make_sample(url, **TINY)
    fsspec.filesystem("memory").rm(url, recursive=True)


def _check(layout: ImageNetLayout, report: dict) -> None:
    assert layout.classes == report["wnids"] and layout.class_names == report["class_names"]
    train, val, test = (layout.samples(s) for s in ("train", "val", "test"))
    assert len(train) == report["train"] and len(val) == report["val"] and len(test) == report["test"]
    for s in train:
        assert s.label == layout.class_index[s.wnid] and s.key.startswith(s.wnid + "_")
        assert s.path == f"ILSVRC/Data/CLS-LOC/train/{s.wnid}/{s.key}.JPEG"
    assert sum(bool(s.boxes) for s in train) == report["train_with_boxes"]
    assert layout.report["train_without_boxes"]["count"] == report["train"] - report["train_with_boxes"]
    assert all(s.boxes and s.boxes[0].wnid == s.wnid and s.label >= 0 for s in val)
    assert all(s.label == -1 and s.wnid is None and not s.boxes for s in test)
    assert [s.key for s in val] == sorted(s.key for s in val)


def test_local_path_and_file_url(tiny_local):
    url, report = tiny_local
    _check(ImageNetLayout(url), report)
    _check(ImageNetLayout(f"file://{url}"), report)


def test_memory_url(memory_copy):
    _check(ImageNetLayout(memory_copy[0]), memory_copy[1])


def test_s3(s3_bucket):
    report = make_sample(f"s3://{s3_bucket}/raw", **TINY)
    _check(ImageNetLayout(f"s3://{s3_bucket}/raw"), report)


def test_one_listing_per_split_and_no_request_per_file(memory_copy):
    layout = ImageNetLayout(memory_copy[0])
    calls = {"find": 0, "other": 0}
    fs = layout.fs
    real_find, real_cat = fs.find, fs.cat_file

    def find(*a, **k):
        calls["find"] += 1
        return real_find(*a, **k)

    def cat_file(*a, **k):
        calls["other"] += 1
        return real_cat(*a, **k)

    fs.find, fs.cat_file = find, cat_file
    try:
        for split in ("train", "val", "test"):
            layout.samples(split)
    finally:
        del fs.find, fs.cat_file
    assert calls["find"] == 3
    assert calls["other"] <= 5  # the two solution CSVs and three ImageSets lists, never one per image


def test_xml_annotations_match_csv_boxes(tiny_local):
    layout = ImageNetLayout(tiny_local[0])
    for split in ("train", "val"):
        s = next(s for s in layout.samples(split) if s.boxes)
        ann = layout.read_annotation(split, s.key)
        assert ann.boxes == list(s.boxes) and ann.width >= 96 and ann.height >= 96


# -- the class mapping ------------------------------------------------------------------------------------

def test_mapping_unsorted_names_file_and_line():
    with pytest.raises(LayoutError, match=r"map.txt:3: n00000002 comes after n00000005"):
        parse_synset_mapping("n00000001 a\nn00000005 b\nn00000002 c\n", "map.txt")


def test_mapping_duplicate_names_both_lines():
    with pytest.raises(LayoutError, match=r"map.txt:3: duplicate wnid n00000002 \(first on line 2\)"):
        parse_synset_mapping("n00000001 a\nn00000002 b\nn00000002 c\n", "map.txt")


@pytest.mark.parametrize("text,match", [("x0001 a\n", ":1: 'x0001' is not a wnid"),
                                        ("n00000001 a\n\nn00000002 b\n", ":2: empty line"), ("", "no classes")])
def test_mapping_malformed(text, match):
    with pytest.raises(LayoutError, match=match):
        parse_synset_mapping(text, "map.txt")


def test_mapping_1000_classes_must_start_with_tench():
    wnids = [f"n{i:08d}" for i in range(2000000, 2001000)]
    with pytest.raises(LayoutError, match="n01440764"):
        parse_synset_mapping("".join(f"{w} x\n" for w in wnids))
    wnids[0] = "n01440764"
    assert parse_synset_mapping("".join(f"{w} x\n" for w in wnids))[0][0] == "n01440764"


def test_mapping_error_from_layout_names_url(tiny_local, tmp_path):
    root = tmp_path / "raw"
    make_sample(str(root), **TINY)
    (root / SYNSET_MAPPING).write_text("n00000002 square\nn00000001 circle\nn00000003 triangle\n")
    with pytest.raises(LayoutError, match=rf"{root}/LOC_synset_mapping.txt:2"):
        ImageNetLayout(str(root))
    (root / SYNSET_MAPPING).unlink()
    with pytest.raises(LayoutError, match="missing file .*LOC_synset_mapping.txt"):
        ImageNetLayout(str(root))


# -- the solution CSVs -----------------------------------------------------------------------------------

INDEX = {"n00000001": 0, "n00000002": 1}


@pytest.mark.parametrize("text,match", [
    ("ImageId\nx\n", r"s.csv:1: header"),
    ("ImageId,PredictionString\na,n00000009 1 2 3 4\n", r"s.csv:2: unknown wnid 'n00000009'"),
    ("ImageId,PredictionString\na,n00000001 1 2 3 4\nb,n00000001 1 2 3\n", r"s.csv:3: PredictionString has 4 fields"),
    ("ImageId,PredictionString\na,n00000001 1 2 3 4,extra\n", r"s.csv:2: 3 columns"),
    ("ImageId,PredictionString\na,n00000001 1 two 3 4\n", r"s.csv:2: box coordinate 'two'"),
    ("ImageId,PredictionString\na,n00000001 5 2 3 4\n", r"s.csv:2: box 5 2 3 4 has max < min"),
    ("ImageId,PredictionString\na,n00000001 1 2 3 4\na,n00000001 1 2 3 4\n", r"s.csv:3: duplicate ImageId a"),
    ("ImageId,PredictionString\n,n00000001 1 2 3 4\n", r"s.csv:2: empty ImageId"),
])
def test_csv_malformed_rows_name_file_and_line(text, match):
    with pytest.raises(LayoutError, match=match):
        parse_solution_csv(text, INDEX, "s.csv")


def test_csv_parses_several_boxes():
    rows = parse_solution_csv("ImageId,PredictionString\na,n00000001 1 2 3 4 n00000002 0 0 9.5 9 \n", INDEX, "s.csv")
    assert rows == {"a": (2, (Box("n00000001", 1, 2, 3, 4), Box("n00000002", 0, 0, 9.5, 9)))}


def test_layout_csv_unknown_wnid_names_file_and_line(tmp_path):
    root = tmp_path / "raw"
    make_sample(str(root), **TINY)
    lines = (root / TRAIN_SOLUTION).read_text().splitlines()
    lines[3] = lines[3].split(",")[0] + ",n09999999 1 1 5 5"
    (root / TRAIN_SOLUTION).write_text("\n".join(lines) + "\n")
    with pytest.raises(LayoutError, match=rf"{TRAIN_SOLUTION}:4: unknown wnid 'n09999999'"):
        ImageNetLayout(str(root)).samples("train")


def test_val_without_label_and_label_without_image(tmp_path):
    root = tmp_path / "raw"
    make_sample(str(root), **TINY)
    lines = (root / VAL_SOLUTION).read_text().splitlines()
    (root / VAL_SOLUTION).write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(LayoutError, match="no row for ILSVRC2012_val_.* so it has no label"):
        ImageNetLayout(str(root)).samples("val")
    (root / VAL_SOLUTION).write_text("\n".join(lines + ["ILSVRC2012_val_00099999,n00000001 1 1 5 5"]) + "\n")
    with pytest.raises(LayoutError, match=rf"{VAL_SOLUTION}:{len(lines) + 1}: image ILSVRC2012_val_00099999 is not"):
        ImageNetLayout(str(root)).samples("val")


def test_tolerated_irregularities_are_counted(tmp_path):
    root = tmp_path / "raw"
    make_sample(str(root), **TINY)
    with open(root / TRAIN_SOLUTION, "a") as f:
        f.write("n00000001_999,n00000001 1 1 5 5\n")
    (root / "ILSVRC/Data/CLS-LOC/train/n00000001/notes.txt").write_text("x")
    (root / "ILSVRC/ImageSets/CLS-LOC/test.txt").unlink()
    layout = ImageNetLayout(str(root))
    layout.samples("train"), layout.samples("test")
    assert layout.report["train_csv_rows_without_image"]["count"] == 1
    assert layout.report["train_ignored_files"]["examples"] == ["n00000001/notes.txt"]
    assert layout.report["missing_imagesets"]["count"] == 1


def test_missing_train_csv_and_empty_split(tmp_path):
    root = tmp_path / "raw"
    make_sample(str(root), **TINY)
    (root / TRAIN_SOLUTION).unlink()
    with pytest.raises(LayoutError, match="missing file .*LOC_train_solution.csv"):
        ImageNetLayout(str(root)).samples("train")
    for f in (root / "ILSVRC/Data/CLS-LOC/test").iterdir():
        f.unlink()
    with pytest.raises(LayoutError, match="no files under .*test"):
        ImageNetLayout(str(root)).samples("test")


def test_unknown_train_folder(tmp_path):
    root = tmp_path / "raw"
    make_sample(str(root), **TINY)
    (root / "ILSVRC/Data/CLS-LOC/train/n00000001").rename(root / "ILSVRC/Data/CLS-LOC/train/n00000777")
    with pytest.raises(LayoutError, match="folder 'n00000777' is not a class"):
        ImageNetLayout(str(root)).samples("train")


# -- boxes and XML -----------------------------------------------------------------------------------------

def test_boxes_outside_the_image_are_clipped_and_counted():
    boxes = [Box("n1", -5, 2, 50, 40), Box("n1", 1, 1, 10, 10), Box("n1", 200, 200, 250, 260)]
    out, clipped, dropped = clip_boxes(boxes, width=40, height=30)
    assert out == [Box("n1", 0, 2, 40, 30), Box("n1", 1, 1, 10, 10)] and (clipped, dropped) == (1, 1)


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<annotation><size><width>&lol2;</width><height>1</height></size></annotation>"""
EXTERNAL = b"""<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<annotation><folder>&x;</folder></annotation>"""


@pytest.mark.parametrize("xml", [BOMB, EXTERNAL])
def test_xml_entities_are_refused(xml):
    with pytest.raises(LayoutError, match="refused unsafe XML"):
        parse_voc_xml(xml, "a.xml")


def test_xml_malformed_and_missing_fields():
    with pytest.raises(LayoutError, match="a.xml: malformed XML"):
        parse_voc_xml(b"<annotation><size>", "a.xml")
    with pytest.raises(LayoutError, match="a.xml: missing <size>"):
        parse_voc_xml(b"<annotation></annotation>", "a.xml")
