"""A small synthetic dataset in the exact Kaggle ILSVRC CLS-LOC layout (see data/layout.py), for demos and tests.

Each class is a procedurally drawn shape (circle, square, triangle, ...) with random position, scale (35-75 %
of the shorter side), rotation and colour, on a random colour gradient with light noise and a light clutter of
short strokes that are not class shapes. Colour is drawn independently of the class (a mean-colour classifier
is at chance); the object contrasts with the background in luminance (light on dark or dark on light, any
hues), so the shape is what a network has to learn, and can. Boxes are the drawn object's true extent
(inclusive pixel coordinates). Like ImageNet, train holds one CMYK JPEG, one
grayscale JPEG, one PNG under a .JPEG name and one truncated file. Output is byte-identical for a seed.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

from data.layout import (ANNOTATION_DIR, CSV_HEADER, DATA_DIR, IMAGESETS_DIR, SAMPLE_SUBMISSION, SYNSET_MAPPING,
                         TRAIN_SOLUTION, VAL_SOLUTION)
from data.storage import fs_and_root

Points = list[tuple[float, float]]

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent", "arrow", "heart",
          "pentagon", "ell")
SIZE_RANGE = (96, 160)  # image width and height, drawn independently
OBJECT_SCALE = (0.35, 0.75)  # object extent as a fraction of the shorter side
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luminance weights
DARK, LIGHT = (15.0, 95.0), (160.0, 245.0)  # luminance ranges of background and object (one each, either way)
BOXED_FRACTION_MOD = 3  # train images whose number % 3 == 2 get no boxes (ImageNet's CSV covers ~42 %)
SPECIALS = ("cmyk", "grayscale", "png_as_jpeg", "truncated")
JPEG_QUALITY = 90
SUBMISSION_GUESSES = 5  # the Kaggle sample submission's guesses per image (evaluation.localize.TOP_K)


def _wnid(c: int) -> str:
    return f"n{c + 1:08d}"


def _rotated(points: Points, cx: float, cy: float, r: float, angle: float) -> Points:
    """Unit-radius local points -> image coordinates (scaled by r, rotated by angle, centred at cx, cy)."""
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in points]


def _regular(n: int, phase: float = -math.pi / 2) -> Points:
    return [(math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star() -> Points:
    return [(rad * math.cos(-math.pi / 2 + math.pi * k / 5), rad * math.sin(-math.pi / 2 + math.pi * k / 5))
            for k, rad in zip(range(10), [1.0, 0.42] * 5)]


def _cross(w: float = 0.32) -> Points:
    return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]


def _arrow() -> Points:
    return [(-1, -0.22), (0.15, -0.22), (0.15, -0.65), (1, 0), (0.15, 0.65), (0.15, 0.22), (-1, 0.22)]


def _heart() -> Points:
    pts = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17, -y / 17))
    return pts


def _ell() -> Points:
    return [(-0.8, -1), (-0.2, -1), (-0.2, 0.45), (0.8, 0.45), (0.8, 1), (-0.8, 1)]


def _unit(points: Points) -> Points:
    """Scale so that the farthest point is at radius 1: every shape then fits the circle it is placed in."""
    scale = max(math.hypot(x, y) for x, y in points)
    return [(x / scale, y / scale) for x, y in points]


POLYGONS = {name: _unit(points) for name, points in {
    "square": _regular(4, math.pi / 4), "triangle": _regular(3), "star": _star(), "cross": _cross(),
    "hexagon": _regular(6), "arrow": _arrow(), "heart": _heart(), "pentagon": _regular(5), "ell": _ell()}.items()}


def _draw_shape(mask: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float) -> None:
    if shape == "circle":
        mask.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "ring":
        mask.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=max(3, int(r * 0.32)))
    elif shape == "crescent":
        mask.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = cx + 0.5 * r * math.cos(angle), cy + 0.5 * r * math.sin(angle)
        mask.ellipse([ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r], fill=0)
    else:
        mask.polygon(_rotated(POLYGONS[shape], cx, cy, r, angle), fill=255)


def _colour(rng: np.random.Generator, luma: tuple[float, float]) -> np.ndarray:
    """A random RGB colour (any hue) whose luminance lies in `luma`: rejection sampling, a few tries at most."""
    while True:
        c = rng.uniform(0, 255, 3)
        if luma[0] <= float(LUMA @ c) <= luma[1]:
            return c


def _background(rng: np.random.Generator, w: int, h: int, luma: tuple[float, float]) -> np.ndarray:
    """A two-colour linear gradient in a random direction plus light noise (HxWx3 float)."""
    c0, c1 = _colour(rng, luma), _colour(rng, luma)
    a = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xx * math.cos(a) + yy * math.sin(a)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    return img + rng.normal(0, rng.uniform(2, 8), (h, w, 3))


def render(shape: str, rng: np.random.Generator) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One image of `shape`: returns (RGB image, box (xmin, ymin, xmax, ymax) inclusive)."""
    w, h = (int(v) for v in rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1, 2))
    # Contrast by luminance, not hue: a dark background with a light object or the reverse, hues random.
    # Any colour can go with any class, yet an edge detector on brightness finds every object.
    dark_background = bool(rng.integers(2))
    bg_luma, object_luma = (DARK, LIGHT) if dark_background else (LIGHT, DARK)
    bg = _background(rng, w, h, bg_luma)
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    side = min(w, h)
    for _ in range(int(rng.integers(2, 6))):  # clutter: short strokes, never closed shapes
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        length, a = rng.uniform(0.05, 0.15) * side, rng.uniform(0, 2 * math.pi)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.line([(x0, y0), (x0 + length * math.cos(a), y0 + length * math.sin(a))], fill=colour,
                  width=int(rng.integers(1, 3)))
    r = rng.uniform(*OBJECT_SCALE) * side / 2
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    mask = Image.new("L", (w, h), 0)
    _draw_shape(ImageDraw.Draw(mask), shape, cx, cy, r, rng.uniform(0, 2 * math.pi))
    img.paste(tuple(int(v) for v in _colour(rng, object_luma)), (0, 0), mask)
    x0, y0, x1, y1 = mask.getbbox()
    return img, (x0, y0, x1 - 1, y1 - 1)


def _encode(img: Image.Image, special: str | None) -> bytes:
    buf = io.BytesIO()
    if special == "cmyk":
        img.convert("CMYK").save(buf, "JPEG", quality=JPEG_QUALITY)
    elif special == "grayscale":
        img.convert("L").save(buf, "JPEG", quality=JPEG_QUALITY)
    elif special == "png_as_jpeg":
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=JPEG_QUALITY)
    data = buf.getvalue()
    return data[: len(data) * 6 // 10] if special == "truncated" else data


def _voc_xml(folder: str, key: str, size: tuple[int, int], wnid: str, box: tuple[int, int, int, int]) -> bytes:
    x0, y0, x1, y1 = box
    return (f"<annotation>\n\t<folder>{folder}</folder>\n\t<filename>{key}</filename>\n"
            f"\t<source>\n\t\t<database>ILSVRC_2012</database>\n\t</source>\n"
            f"\t<size>\n\t\t<width>{size[0]}</width>\n\t\t<height>{size[1]}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
            f"\t<segmented>0</segmented>\n\t<object>\n\t\t<name>{wnid}</name>\n\t\t<pose>Unspecified</pose>\n"
            f"\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n"
            f"\t\t\t<ymin>{y0}</ymin>\n\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n"
            f"\t</object>\n</annotation>\n").encode()


def make_sample(out_url: str, classes: int = 5, per_class: int = 200, val_per_class: int = 40, test: int = 50,
                seed: int = 0) -> dict:
    """Write the synthetic dataset under `out_url` (any fsspec URL); returns a report of what was written.

    Defaults (5 classes, 200 train + 40 val per class, 50 test) take a few seconds on one core.
    """
    _check_sizes(classes, per_class, val_per_class, test)
    wnids = [_wnid(c) for c in range(classes)]
    files: dict[str, bytes] = {}
    train_cls, train_loc, train_csv, special_keys = _train_split(files, wnids, per_class, seed)
    val_lines, val_csv = _val_split(files, wnids, val_per_class, seed)
    test_lines, submission = _test_split(files, wnids, test, seed)

    def text(lines: list[str]) -> bytes:
        return ("\n".join(lines) + "\n").encode()

    files[SYNSET_MAPPING] = text([f"{w} {SHAPES[c]}" for c, w in enumerate(wnids)])
    files[TRAIN_SOLUTION] = text(train_csv)
    files[VAL_SOLUTION] = text(val_csv)
    files[SAMPLE_SUBMISSION] = text(submission)
    files[f"{IMAGESETS_DIR}/train_cls.txt"] = text(train_cls)
    files[f"{IMAGESETS_DIR}/train_loc.txt"] = text(train_loc)
    files[f"{IMAGESETS_DIR}/val.txt"] = text(val_lines)
    files[f"{IMAGESETS_DIR}/test.txt"] = text(test_lines)
    _write_all(out_url, files)
    return {"url": out_url, "classes": classes, "class_names": list(SHAPES[:classes]), "wnids": wnids,
            "train": classes * per_class, "train_with_boxes": len(train_loc), "val": len(val_lines),
            "test": test, "files": len(files), "bytes": sum(map(len, files.values())), "special": special_keys,
            "seed": seed}


def _check_sizes(classes: int, per_class: int, val_per_class: int, test: int) -> None:
    if not 1 <= classes <= len(SHAPES):
        raise ValueError(f"classes={classes}; valid: 1..{len(SHAPES)} ({', '.join(SHAPES)})")
    if per_class < 1 or classes * per_class < len(SPECIALS) + classes or val_per_class < 1 or test < 0:
        raise ValueError(f"per_class={per_class}, val_per_class={val_per_class}, test={test}: need per_class >= 1 "
                         f"with classes * per_class >= {len(SPECIALS)} + classes (room for the special files), "
                         "val_per_class >= 1, test >= 0")


def _train_split(files: dict[str, bytes], wnids: list[str], per_class: int,
                 seed: int) -> tuple[list[str], list[str], list[str], dict[str, str]]:
    """Train images (with the special files) and their boxes into `files`; returns (train_cls.txt lines,
    train_loc.txt lines, LOC_train_solution.csv lines, special name -> key)."""
    classes = len(wnids)
    train_cls, train_loc, train_csv = [], [], [",".join(CSV_HEADER)]
    # Specials sit on the first images of successive classes (class j % K, image j // K).
    specials = {(j % classes, j // classes): name for j, name in enumerate(SPECIALS)}
    special_keys: dict[str, str] = {}
    for c, wnid in enumerate(wnids):
        for n in range(per_class):
            key = f"{wnid}_{n + 1}"
            img, box = render(SHAPES[c], np.random.default_rng([seed, 0, c, n]))
            special = specials.get((c, n))
            if special:
                special_keys[special] = key
            files[f"{DATA_DIR}/train/{wnid}/{key}.JPEG"] = _encode(img, special)
            train_cls.append(f"{wnid}/{key} {len(train_cls) + 1}")
            if n % BOXED_FRACTION_MOD != 2:
                train_loc.append(f"{wnid}/{key} {len(train_loc) + 1}")
                train_csv.append(f"{key},{wnid} {' '.join(map(str, box))} ")
                files[f"{ANNOTATION_DIR}/train/{wnid}/{key}.xml"] = _voc_xml(wnid, key, img.size, wnid, box)
    return train_cls, train_loc, train_csv, special_keys


def _val_split(files: dict[str, bytes], wnids: list[str], val_per_class: int,
               seed: int) -> tuple[list[str], list[str]]:
    """Val images in a shuffled class order and their boxes into `files`; returns (val.txt lines,
    LOC_val_solution.csv lines)."""
    val_lines, val_csv = [], [",".join(CSV_HEADER)]
    val_classes = np.random.default_rng([seed, 1]).permutation(np.repeat(np.arange(len(wnids)), val_per_class))
    for i, c in enumerate(val_classes.tolist()):
        key, wnid = f"ILSVRC2012_val_{i + 1:08d}", wnids[c]
        img, box = render(SHAPES[c], np.random.default_rng([seed, 1, i]))
        files[f"{DATA_DIR}/val/{key}.JPEG"] = _encode(img, None)
        files[f"{ANNOTATION_DIR}/val/{key}.xml"] = _voc_xml("val", key, img.size, wnid, box)
        val_lines.append(f"{key} {i + 1}")
        val_csv.append(f"{key},{wnid} {' '.join(map(str, box))} ")
    return val_lines, val_csv


def _test_split(files: dict[str, bytes], wnids: list[str], test: int, seed: int) -> tuple[list[str], list[str]]:
    """Unlabelled test images into `files`; returns (test.txt lines, LOC_sample_submission.csv lines)."""
    test_lines, submission = [], [",".join(CSV_HEADER)]
    test_rng = np.random.default_rng([seed, 2])
    for i in range(test):
        key = f"ILSVRC2012_test_{i + 1:08d}"
        img, _ = render(SHAPES[int(test_rng.integers(len(wnids)))], np.random.default_rng([seed, 2, i]))
        files[f"{DATA_DIR}/test/{key}.JPEG"] = _encode(img, None)
        test_lines.append(f"{key} {i + 1}")
        submission.append(f"{key}," + " ".join(f"{w} 0 0 0 0" for w in wnids[:SUBMISSION_GUESSES]))
    return test_lines, submission


def _write_all(out_url: str, files: dict[str, bytes]) -> None:
    """Write every file; parent folders first (local filesystems need them), then one batched `pipe`."""
    fs, root = fs_and_root(out_url)
    for folder in sorted({p.rsplit("/", 1)[0] for p in files if "/" in p} | {""}):
        fs.makedirs(f"{root}/{folder}".rstrip("/"), exist_ok=True)
    fs.pipe({f"{root}/{p}": data for p, data in files.items()})
