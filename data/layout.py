"""Reader for the Kaggle "ImageNet Object Localization Challenge" layout of ILSVRC-2012 CLS-LOC, on any
fsspec URL (local path, file://, s3://, gs://, memory://).

    LOC_synset_mapping.txt          line i = class i: "n01440764 tench, Tinca tinca" (sorted wnids)
    LOC_train_solution.csv          ImageId,PredictionString ("wnid xmin ymin xmax ymax" repeated); only
                                    train images that have boxes (about 544k of 1.28M)
    LOC_val_solution.csv            same columns, every val image: its labels and boxes
    LOC_sample_submission.csv       ImageId,PredictionString for test
    ILSVRC/Data/CLS-LOC/{train/<wnid>/<wnid>_<n>.JPEG, val/ILSVRC2012_val_<8 digits>.JPEG, test/...}
    ILSVRC/Annotations/CLS-LOC/{train/<wnid>/<id>.xml, val/<id>.xml}  (PASCAL VOC)
    ILSVRC/ImageSets/CLS-LOC/{train_cls.txt, val.txt, test.txt, train_loc.txt}

Class index = line order of LOC_synset_mapping.txt, which must be the sorted wnid order (index 0 = n01440764
for the full 1000 classes). Train labels come from folder names, val labels and all boxes from the CSVs.
Each split is listed with one recursive `find`, never a request per file.

Decisions: a malformed or inconsistent input that would make labels wrong (unknown wnid, bad row, unsorted
mapping, val image without a label) raises `LayoutError` naming the file and line. Anything a run can live
with (a train image without boxes, a CSV row for an image that is not there, files that are not images, an
ImageSets list that disagrees with the listing) is counted in `report`. Boxes are checked for shape here
(four numbers, min <= max); boxes reaching outside the image are clipped to it by `clip_boxes` once the
image size is known (jobs.prepare counts them), and boxes entirely outside are dropped and counted.
"""
from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any

from defusedxml import ElementTree as SafeET
from defusedxml.common import DefusedXmlException

from data.storage import fs_and_root

DATA_DIR = "ILSVRC/Data/CLS-LOC"
ANNOTATION_DIR = "ILSVRC/Annotations/CLS-LOC"
IMAGESETS_DIR = "ILSVRC/ImageSets/CLS-LOC"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
TRAIN_SOLUTION = "LOC_train_solution.csv"
VAL_SOLUTION = "LOC_val_solution.csv"
SAMPLE_SUBMISSION = "LOC_sample_submission.csv"
SPLITS = ("train", "val", "test")
IMAGENET_FIRST_WNID = "n01440764"  # tench: class 0 of the canonical sorted 1000-class order
CSV_HEADER = ["ImageId", "PredictionString"]
IMAGE_SUFFIXES = (".jpeg", ".jpg")

WNID_RE = re.compile(r"n\d{8}")
EXAMPLES = 5  # how many example names a report or an error message keeps per count


class LayoutError(ValueError):
    """The dataset layout is missing a file or holds a malformed entry; the message names file and line."""


@dataclass(frozen=True, slots=True)
class Box:
    """One object box in pixel coordinates, as written in the solution CSVs."""

    wnid: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float

    def as_list(self) -> list:
        return [self.wnid, self.xmin, self.ymin, self.xmax, self.ymax]


@dataclass(frozen=True, slots=True)
class Sample:
    """One image: `key` is the image id (file name up to the first dot), `path` is relative to the root."""

    key: str
    path: str
    label: int  # -1 when unknown (test)
    wnid: str | None
    boxes: tuple[Box, ...] = ()


@dataclass
class VocAnnotation:
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)


def _number(text: str, source: str, line: int) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LayoutError(f"{source}:{line}: box coordinate {text!r} is not a number") from None
    if not math.isfinite(value):
        raise LayoutError(f"{source}:{line}: box coordinate {text!r} is not finite")
    return int(value) if value.is_integer() else value


def parse_synset_mapping(text: str, source: str = SYNSET_MAPPING) -> tuple[list[str], list[str]]:
    """Parse `LOC_synset_mapping.txt` into (wnids, names); the wnids must be unique and strictly sorted."""
    wnids: list[str] = []
    names: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            if any(rest.strip() for rest in text.splitlines()[lineno:]):
                raise LayoutError(f"{source}:{lineno}: empty line; expected 'wnid name' on every line")
            break
        wnid, _, name = line.strip().partition(" ")
        if not WNID_RE.fullmatch(wnid):
            raise LayoutError(f"{source}:{lineno}: {wnid!r} is not a wnid (expected 'n' + 8 digits, e.g. n01440764)")
        if wnid in seen:
            raise LayoutError(f"{source}:{lineno}: duplicate wnid {wnid} (first on line {seen[wnid]})")
        if wnids and wnid < wnids[-1]:
            raise LayoutError(
                f"{source}:{lineno}: {wnid} comes after {wnids[-1]}; class index = line order, which must be "
                "the sorted wnid order"
            )
        seen[wnid] = lineno
        wnids.append(wnid)
        names.append(name.strip())
    if not wnids:
        raise LayoutError(f"{source}: no classes")
    if len(wnids) == 1000 and wnids[0] != IMAGENET_FIRST_WNID:
        raise LayoutError(f"{source}:1: class 0 is {wnids[0]}; the canonical 1000-class order starts with "
                          f"{IMAGENET_FIRST_WNID} (tench)")
    return wnids, names


def parse_solution_csv(text: str, class_index: dict[str, int], source: str) -> dict[str, tuple[int, tuple[Box, ...]]]:
    """Parse a `LOC_*_solution.csv` into {image_id: (line number, boxes)}; any malformed row raises."""
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None or [h.strip() for h in header] != CSV_HEADER:
        raise LayoutError(f"{source}:1: header is {header!r}; expected {','.join(CSV_HEADER)}")
    out: dict[str, tuple[int, tuple[Box, ...]]] = {}
    for lineno, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) != 2:
            raise LayoutError(f"{source}:{lineno}: {len(row)} columns; expected 2 ({','.join(CSV_HEADER)})")
        image_id, prediction = row[0].strip(), row[1].split()
        if not image_id:
            raise LayoutError(f"{source}:{lineno}: empty ImageId")
        if image_id in out:
            raise LayoutError(f"{source}:{lineno}: duplicate ImageId {image_id} (first on line {out[image_id][0]})")
        if not prediction or len(prediction) % 5:
            raise LayoutError(f"{source}:{lineno}: PredictionString has {len(prediction)} fields; expected groups "
                              "of 5 ('wnid xmin ymin xmax ymax')")
        boxes = []
        for i in range(0, len(prediction), 5):
            wnid = prediction[i]
            if wnid not in class_index:
                raise LayoutError(f"{source}:{lineno}: unknown wnid {wnid!r} (not in {SYNSET_MAPPING})")
            x0, y0, x1, y1 = (_number(v, source, lineno) for v in prediction[i + 1:i + 5])
            if x1 < x0 or y1 < y0:
                raise LayoutError(f"{source}:{lineno}: box {x0} {y0} {x1} {y1} has max < min")
            boxes.append(Box(wnid, x0, y0, x1, y1))
        out[image_id] = (lineno, tuple(boxes))
    return out


def parse_voc_xml(data: bytes, source: str) -> VocAnnotation:
    """Parse a PASCAL VOC annotation with defusedxml: entity declarations and external references are refused."""
    try:
        root = SafeET.fromstring(data)
    except DefusedXmlException as e:
        raise LayoutError(f"{source}: refused unsafe XML ({type(e).__name__}: {e})") from e
    except SafeET.ParseError as e:
        raise LayoutError(f"{source}: malformed XML: {e}") from e

    def text(node, tag: str) -> str:
        child = node.find(tag)
        if child is None or child.text is None:
            raise LayoutError(f"{source}: missing <{tag}>")
        return child.text.strip()

    size = root.find("size")
    if size is None:
        raise LayoutError(f"{source}: missing <size>")
    ann = VocAnnotation(width=int(_number(text(size, "width"), source, 0)),
                        height=int(_number(text(size, "height"), source, 0)))
    for obj in root.iter("object"):
        bnd = obj.find("bndbox")
        if bnd is None:
            raise LayoutError(f"{source}: <object> without <bndbox>")
        coords = [_number(text(bnd, t), source, 0) for t in ("xmin", "ymin", "xmax", "ymax")]
        ann.boxes.append(Box(text(obj, "name"), *coords))
    return ann


def clip_boxes(boxes: tuple[Box, ...] | list[Box], width: int, height: int) -> tuple[list[Box], int, int]:
    """Clip boxes to [0, width] x [0, height]; returns (boxes, number clipped, number dropped as entirely outside)."""
    out, clipped, dropped = [], 0, 0
    for b in boxes:
        x0, y0 = min(max(b.xmin, 0), width), min(max(b.ymin, 0), height)
        x1, y1 = min(max(b.xmax, 0), width), min(max(b.ymax, 0), height)
        if x1 <= x0 or y1 <= y0:
            dropped += 1
            continue
        if (x0, y0, x1, y1) != (b.xmin, b.ymin, b.xmax, b.ymax):
            clipped += 1
        out.append(Box(b.wnid, x0, y0, x1, y1))
    return out, clipped, dropped


class ImageNetLayout:
    """The Kaggle ILSVRC layout under `url`. Reads the class mapping at once, each split on demand.

    `classes` (wnids), `class_names`, `class_index` (wnid -> index) and `report` (counts of tolerated
    irregularities, with a few example names each).
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fs_and_root(self.url)
        text = self._read_text(SYNSET_MAPPING)
        self.classes, self.class_names = parse_synset_mapping(text, self._where(SYNSET_MAPPING))
        self.class_index = {w: i for i, w in enumerate(self.classes)}
        self.report: dict[str, Any] = {}
        self._samples: dict[str, list[Sample]] = {}

    # -- helpers ---------------------------------------------------------------------------------------
    def _where(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def _read_text(self, rel: str, required: bool = True) -> str | None:
        path = f"{self.root}/{rel}"
        try:
            return self.fs.cat_file(path).decode("utf-8")
        except FileNotFoundError:
            if required:
                raise LayoutError(f"missing file {self._where(rel)}") from None
            return None
        except UnicodeDecodeError as e:
            raise LayoutError(f"{self._where(rel)}: not UTF-8 text ({e})") from e

    def _count(self, name: str, example: str | None = None, n: int = 1) -> None:
        entry = self.report.setdefault(name, {"count": 0, "examples": []})
        entry["count"] += n
        if example is not None and len(entry["examples"]) < EXAMPLES:
            entry["examples"].append(example)

    def _list(self, split: str) -> list[str]:
        """Relative paths (under the split folder) of every file of a split: one recursive listing."""
        base = f"{self.root}/{DATA_DIR}/{split}"
        found = self.fs.find(base)
        prefix = self.fs._strip_protocol(base).rstrip("/") + "/"
        rel = sorted(p[len(prefix):] for p in found if p.startswith(prefix))
        if not rel:
            raise LayoutError(f"no files under {self._where(f'{DATA_DIR}/{split}')} (split {split!r})")
        return rel

    def _images(self, split: str) -> list[tuple[str, str]]:
        """(key, path under the split folder) of every image file; other files are counted, not used."""
        out = []
        for rel in self._list(split):
            name = rel.rsplit("/", 1)[-1]
            if not name.lower().endswith(IMAGE_SUFFIXES):
                self._count(f"{split}_ignored_files", rel)
                continue
            out.append((name.split(".", 1)[0], rel))
        return out

    def _solution(self, rel: str) -> dict[str, tuple[int, tuple[Box, ...]]]:
        return parse_solution_csv(self._read_text(rel), self.class_index, self._where(rel))

    def _check_imageset(self, name: str, split: str, ids: set[str]) -> None:
        """Compare an ImageSets list with the listing; differences are counted (the listing is used)."""
        rel = f"{IMAGESETS_DIR}/{name}"
        text = self._read_text(rel, required=False)
        if text is None:
            self._count("missing_imagesets", rel)
            return
        listed = {line.split()[0].rsplit("/", 1)[-1] for line in text.splitlines() if line.strip()}
        for missing in sorted(listed - ids):
            self._count(f"{split}_imageset_entries_without_image", missing)
        for extra in sorted(ids - listed):
            self._count(f"{split}_images_not_in_imageset", extra)

    # -- splits ------------------------------------------------------------------------------------------
    def samples(self, split: str) -> list[Sample]:
        """Every sample of `split`, sorted by key. Paths are relative to the layout root."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}; valid: {', '.join(SPLITS)}")
        if split not in self._samples:
            self._samples[split] = getattr(self, f"_read_{split}")()
        return self._samples[split]

    def _read_train(self) -> list[Sample]:
        boxes = self._solution(TRAIN_SOLUTION)
        out = []
        for key, rel in self._images("train"):
            parts = rel.split("/")
            if len(parts) != 2:
                raise LayoutError(f"{self._where(f'{DATA_DIR}/train/{rel}')}: expected train/<wnid>/<file>")
            wnid = parts[0]
            if wnid not in self.class_index:
                raise LayoutError(f"{self._where(f'{DATA_DIR}/train/{wnid}')}: folder {wnid!r} is not a class "
                                  f"of {SYNSET_MAPPING}")
            if not key.startswith(wnid + "_"):
                self._count("train_files_named_for_another_class", rel)
            entry = boxes.pop(key, None)
            if entry is None:
                self._count("train_without_boxes")
            elif any(b.wnid != wnid for b in entry[1]):
                self._count("train_boxes_of_another_class", f"{TRAIN_SOLUTION}:{entry[0]}")
            out.append(Sample(key, f"{DATA_DIR}/train/{rel}", self.class_index[wnid], wnid,
                              entry[1] if entry else ()))
        for image_id, (lineno, _) in sorted(boxes.items(), key=lambda kv: kv[1][0]):
            self._count("train_csv_rows_without_image", f"{TRAIN_SOLUTION}:{lineno} {image_id}")
        for wnid in sorted(set(self.classes) - {s.wnid for s in out}):
            self._count("classes_without_train_images", wnid)
        self._check_imageset("train_cls.txt", "train", {s.key for s in out})
        return sorted(out, key=lambda s: s.key)

    def _read_val(self) -> list[Sample]:
        solution = self._solution(VAL_SOLUTION)
        out = []
        for key, rel in self._images("val"):
            entry = solution.pop(key, None)
            if entry is None:
                raise LayoutError(f"{self._where(f'{DATA_DIR}/val/{rel}')}: no row for {key} in "
                                  f"{self._where(VAL_SOLUTION)}, so it has no label")
            lineno, boxes = entry
            wnids = {b.wnid for b in boxes}
            if len(wnids) != 1:
                raise LayoutError(f"{self._where(VAL_SOLUTION)}:{lineno}: boxes name {len(wnids)} classes "
                                  f"({', '.join(sorted(wnids))}); a val image has one label")
            wnid = boxes[0].wnid
            out.append(Sample(key, f"{DATA_DIR}/val/{rel}", self.class_index[wnid], wnid, boxes))
        if solution:
            image_id, (lineno, _) = min(solution.items(), key=lambda kv: kv[1][0])
            raise LayoutError(f"{self._where(VAL_SOLUTION)}:{lineno}: image {image_id} is not under "
                              f"{self._where(f'{DATA_DIR}/val')} ({len(solution)} rows without an image)")
        self._check_imageset("val.txt", "val", {s.key for s in out})
        return sorted(out, key=lambda s: s.key)

    def _read_test(self) -> list[Sample]:
        out = [Sample(key, f"{DATA_DIR}/test/{rel}", -1, None) for key, rel in self._images("test")]
        self._check_imageset("test.txt", "test", {s.key for s in out})
        return sorted(out, key=lambda s: s.key)

    def read_annotation(self, split: str, key: str) -> VocAnnotation:
        """The PASCAL VOC XML of one train or val image (parsed safely)."""
        rel = f"{ANNOTATION_DIR}/train/{key.split('_')[0]}/{key}.xml" if split == "train" else \
            f"{ANNOTATION_DIR}/{split}/{key}.xml"
        try:
            data = self.fs.cat_file(f"{self.root}/{rel}")
        except FileNotFoundError:
            raise LayoutError(f"missing file {self._where(rel)}") from None
        return parse_voc_xml(data, self._where(rel))

    def read_bytes(self, sample: Sample) -> bytes:
        return self.fs.cat_file(f"{self.root}/{sample.path}")
