"""Checks on a lot before it is sent: lots too small for mutual scoring to mean anything, images that lie the other
way round or have another shape than the rest, and the same image twice.

Mutual scoring scores each image against the other images of its lot. With 2 images each is the other's only
reference and both get the same score; the figures behind the two limits below are in the README ("Lot size"),
measured with ``python -m benchmarks.lot_size``.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MIN_LOT_IMAGES = 3  # below this a lot is refused: with 2 images both get the same score
WEAK_LOT_IMAGES = 16  # below this a warning: the margin of a defective image over a good one is still growing
ASPECT_TOLERANCE = 0.25  # an image whose aspect ratio is off the lot's median by more than this is named
SQUARE_TOLERANCE = 0.05  # sides within this of each other: neither landscape nor portrait
NAMED = 10  # images named in one warning, at most
ORIENTATIONS = ("keep", "majority")


def sha256_of(path: str | Path) -> str:
    """The file's SHA-256, read once per version of it in a process (the main job's check and the run it starts
    both need a lot's digests: every file was read twice); a file written since (size, mtime or inode changed) is
    read again."""
    stat = os.stat(path)
    return _sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=1 << 16)
def _sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def orientation_of(width: int, height: int) -> str:
    if width > height * (1 + SQUARE_TOLERANCE):
        return "landscape"
    if height > width * (1 + SQUARE_TOLERANCE):
        return "portrait"
    return "square"


def _names(paths) -> str:
    paths = [Path(p).name for p in paths]
    more = f" and {len(paths) - NAMED} more" if len(paths) > NAMED else ""
    return ", ".join(paths[:NAMED]) + more


@dataclass
class LotCheck:
    """What the checks found: ``refusal`` (a reason the lot cannot be scored, or None), ``warnings`` (sentences),
    ``turn`` (paths to turn a quarter, counter-clockwise, with ``--orientation majority``)."""

    refusal: str | None = None
    warnings: list[str] = field(default_factory=list)
    turn: set = field(default_factory=set)


def check_orientation(sizes: dict, orientation: str, target: str | None = None) -> LotCheck:
    """``sizes``: path -> (width, height) of the upright image. ``target``: the orientation to match (a bank's), or
    None for the lot's majority. Names the images that lie the other way; with ``orientation="majority"`` they are
    to be turned."""
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    found = LotCheck()
    kinds = {path: orientation_of(*wh) for path, wh in sizes.items()}
    counts = Counter(k for k in kinds.values() if k != "square")
    if target is None:
        if not counts:
            return found
        target = counts.most_common(1)[0][0]
    if target == "square":
        return found
    other = sorted(p for p, k in kinds.items() if k not in (target, "square"))
    if not other:
        return found
    if orientation == "majority":
        found.turn = set(other)
        found.warnings.append(f"{len(other)} image(s) lie {'portrait' if target == 'landscape' else 'landscape'} "
                              f"in a {target} lot and are turned a quarter to match (their maps are turned back): "
                              f"{_names(other)}")
    else:
        found.warnings.append(f"{len(other)} image(s) lie the other way from the {target} lot and will be stretched "
                              f"to its shape, which makes them look anomalous: {_names(other)}. If they are the "
                              "same parts photographed turned, add --orientation majority")
    return found


def check_aspect(sizes: dict, turned: set) -> list[str]:
    """Images whose aspect ratio (after turning) is off the lot's median by more than ASPECT_TOLERANCE."""
    aspects = {p: (h / w if p in turned else w / h) for p, (w, h) in sizes.items() if w and h}
    if len(aspects) < 2:
        return []
    median = float(np.median(list(aspects.values())))
    off = sorted(p for p, a in aspects.items() if abs(np.log(a / median)) > np.log1p(ASPECT_TOLERANCE))
    if not off:
        return []
    return [f"{len(off)} image(s) have another shape than the lot (aspect ratio off its median {median:.2f} by more "
            f"than {ASPECT_TOLERANCE:.0%}) and will be stretched to it: {_names(off)}"]


def check_duplicates(hashes: dict) -> list[str]:
    """``hashes``: path -> SHA-256 of the file. Each group of identical files, named."""
    groups = defaultdict(list)
    for path, digest in hashes.items():
        groups[digest].append(path)
    same = [sorted(g) for g in groups.values() if len(g) > 1]
    return [f"identical files (the same image twice counts twice as a reference for the others): {_names(g)}"
            for g in same]


def check_lot_size(n_images: int, n_different: int | None = None) -> LotCheck:
    """The lot's size, counted in ``n_different`` images where given (copies of one image are one: none is scored
    against its copy; a lot of 12 copies was refused by the server only after its upload and the build's start)."""
    found = LotCheck()
    different = n_images if n_different is None else n_different
    if different < MIN_LOT_IMAGES:
        copies = "" if different == n_images else f" ({different} different: copies of an image are one)"
        found.refusal = (f"a lot of {n_images} image(s){copies} cannot be scored: each image is scored against the "
                         f"others of its lot, and below {MIN_LOT_IMAGES} different images a defective image is not "
                         f"told from a good one. Send at least {MIN_LOT_IMAGES} (at least {WEAK_LOT_IMAGES} for "
                         "dependable scores), or score these images against a bank built from a larger lot "
                         "(pa-clip score --bank NAME, without --build)")
        return found
    if different < WEAK_LOT_IMAGES:
        copies = "" if different == n_images else f" ({different} different)"
        found.warnings.append(f"a lot of {n_images} images{copies} is small: scores are weak below {WEAK_LOT_IMAGES} "
                              "(README, 'Lot size')")
    return found


__all__ = ["LotCheck", "check_orientation", "check_aspect", "check_duplicates", "check_lot_size", "sha256_of",
           "orientation_of", "MIN_LOT_IMAGES", "WEAK_LOT_IMAGES", "ORIENTATIONS"]
