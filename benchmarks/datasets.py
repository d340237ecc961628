"""Data set layouts: MVTec AD (with masks), VisA (its split csv) and a plain folder of images.

Only the test split is used: PA-CLIP is zero-shot and transductive, the lot is the test images themselves.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from client.images import IMAGE_SUFFIXES, image_size_of, model_input, read_rgb
from postprocess.contract import size_pair

LAYOUTS = ("mvtec", "visa", "folder")


class DatasetError(ValueError):
    """A data root that cannot be read as the layout asked for; the message says what was expected."""


@dataclass
class Sample:
    path: Path
    label: int | None  # 1 = defective, 0 = good, None = unknown
    mask_path: Path | None = None
    defect_type: str = ""


@dataclass
class Category:
    name: str
    samples: list[Sample]
    has_masks: bool = False


@dataclass
class LoadedCategory:
    name: str
    images: np.ndarray  # (N, H, W, 3) uint8, at the lot's input size
    labels: np.ndarray | None  # (N,) int, or None for unlabelled folders
    masks: np.ndarray | None  # (N, H, W) bool, or None without pixel labels
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _mvtec_category(cat_dir: Path) -> Category:
    test = cat_dir / "test"
    samples: list[Sample] = []
    has_masks = (cat_dir / "ground_truth").is_dir()
    for type_dir in sorted(p for p in test.iterdir() if p.is_dir()):
        good = type_dir.name == "good"
        for path in _images_in(type_dir):
            mask = None
            if not good and has_masks:
                candidate = cat_dir / "ground_truth" / type_dir.name / f"{path.stem}_mask.png"
                mask = candidate if candidate.is_file() else None
            samples.append(Sample(path, 0 if good else 1, mask, type_dir.name))
    if has_masks and not any(s.mask_path for s in samples if s.label == 1):
        has_masks = False
    return Category(cat_dir.name, samples, has_masks)


def _visa_categories(root: Path) -> list[Category]:
    split = root / "split_csv" / "1cls.csv"
    by_object: dict[str, list[Sample]] = {}
    with open(split, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"object", "split", "label", "image"} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{split} lacks the columns {sorted(missing)}")
        for row in reader:
            if row["split"] != "test":
                continue
            label = 0 if row["label"] == "normal" else 1
            mask = root / row["mask"] if label and row.get("mask") else None
            by_object.setdefault(row["object"], []).append(
                Sample(root / row["image"], label, mask, row["label"]))
    return [Category(name, samples, any(s.mask_path for s in samples)) for name, samples in sorted(by_object.items())]


def discover(root: str | Path, layout: str, categories: list[str] | None = None) -> list[Category]:
    """The categories under ``root`` in the given layout (optionally only the named ones)."""
    root = Path(root)
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown data set layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise DatasetError(f"data root {root} is not a folder")
    if layout == "mvtec":
        dirs = [root] if (root / "test").is_dir() else sorted(p for p in root.iterdir() if (p / "test").is_dir())
        if not dirs:
            raise DatasetError(f"{root} is not in the MVTec AD layout: expected <category>/test/<type>/*.png")
        found = [_mvtec_category(d) for d in dirs]
    elif layout == "visa":
        if not (root / "split_csv" / "1cls.csv").is_file():
            raise DatasetError(f"{root} is not in the VisA layout: expected split_csv/1cls.csv")
        found = _visa_categories(root)
    else:
        images = _images_in(root)
        found = [Category(root.name, [Sample(p, None) for p in images])]
    if categories:
        unknown = set(categories) - {c.name for c in found}
        if unknown:
            raise DatasetError(f"categories {sorted(unknown)} not found under {root}; "
                               f"found {[c.name for c in found]}")
        found = [c for c in found if c.name in categories]
    for cat in found:
        if not cat.samples:
            raise DatasetError(f"category {cat.name!r} under {root} has no test images")
    return found


def read_mask(path: Path | None, image_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """The mask at the lot's (height, width); ``image_size`` is its image's (width, height)."""
    height, width = size
    if path is None:
        return np.zeros((height, width), dtype=bool)
    with Image.open(path) as img:
        mask = img.convert("L")
        if mask.size != image_size:
            warnings.warn(f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image is "
                          f"{image_size[0]}x{image_size[1]}; resizing the mask", stacklevel=2)
        # MVTec's masks are 0/255, some sets' (VisA as distributed) 0/1, which read as > 127 were empty
        values = np.asarray(mask.resize((width, height), Image.NEAREST))
        return values > (0 if values.max(initial=0) <= 1 else 127)


def original_sizes(category: Category) -> list[tuple[int, int]]:
    """The (width, height) of each readable image of a category, from the file headers."""
    return [size for size in (image_size_of(s.path) for s in category.samples) if size is not None]


def load_category(category: Category, size) -> LoadedCategory:
    """Read a category's images (and masks) resized to ``size`` (height, width), the lot's encoder input (see
    ``export.backbones.input_size_for``); unreadable images are skipped with a warning."""
    size = size_pair(size)
    images, masks, labels, kept, skipped = [], [], [], [], []
    for sample in category.samples:
        try:
            rgb = read_rgb(sample.path, min_size=size)
        except ValueError as err:
            warnings.warn(f"skipping {sample.path}: {err}", stacklevel=2)
            skipped.append((str(sample.path), str(err)))
            continue
        # the file's upright size, not the decoded one: a JPEG decoded small warned of every mask as mis-sized
        original_size = image_size_of(sample.path) or rgb.size
        images.append(model_input(rgb, size))
        labels.append(sample.label)
        kept.append(sample)
        if category.has_masks:
            masks.append(read_mask(sample.mask_path, original_size, size))
    if not images:
        raise DatasetError(f"category {category.name!r}: none of its {len(category.samples)} images could be read")
    labelled = all(label is not None for label in labels)
    return LoadedCategory(
        category.name,
        np.stack(images),
        np.asarray(labels, dtype=np.int64) if labelled else None,
        np.stack(masks) if category.has_masks else None,
        kept,
        skipped,
    )
