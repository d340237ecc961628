"""A small lot of synthetic product photos that works on any machine: metal washers on a dark belt.

Most washers are fine; a few carry a scratch, a dark pit or a chipped edge. The lot is generated from a seed, so
every machine gets the same pictures; ``<folder>.truth.json`` beside the folder says which images are defective (for
a quick sanity check, never used by the method). It is kept out of the folder: a scoring run notes every file of a
lot's folder that it does not read, and the demo's own answer key is no such file.

  python -m client.demo_lot --out out/demo_lot     (writes out/demo_lot/*.png and out/demo_lot.truth.json)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEFECTS = ("scratch", "pit", "chip")


def washer(rng: np.random.Generator, size: int, defect: str | None) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + rng.normal(0, size * 0.01, 2)
    radius = np.hypot(xx - cx, yy - cy)
    outer, inner = size * 0.38, size * 0.16
    belt = 40 + 6 * rng.standard_normal((size, size))
    # brushed metal: radial shading plus fine concentric grain
    grain = 8 * np.sin(radius * 1.7 + rng.uniform(0, 6.28)) + 5 * rng.standard_normal((size, size))
    metal = 150 + 45 * (1 - np.abs(radius - (outer + inner) / 2) / ((outer - inner) / 2)) + grain
    ring = (radius <= outer) & (radius >= inner)
    gray = np.where(ring, metal, belt)
    rgb = np.stack([gray * 1.0, gray * 0.98, gray * 0.93], axis=-1)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    angle = rng.uniform(0, 2 * np.pi)
    mid = (outer + inner) / 2
    px, py = cx + mid * np.cos(angle), cy + mid * np.sin(angle)
    if defect == "scratch":
        dx, dy = np.cos(angle + 1.2) * size * 0.09, np.sin(angle + 1.2) * size * 0.09
        draw.line([px - dx, py - dy, px + dx, py + dy], fill=(60, 58, 55), width=max(2, size // 120))
    elif defect == "pit":
        r = size * 0.025
        draw.ellipse([px - r, py - r, px + r, py + r], fill=(35, 33, 30))
    elif defect == "chip":
        ex, ey = cx + outer * np.cos(angle), cy + outer * np.sin(angle)
        r = size * 0.05
        draw.ellipse([ex - r, ey - r, ex + r, ey + r], fill=(40, 40, 40))
    return img.filter(ImageFilter.GaussianBlur(0.6))


def truth_path(folder: str | Path) -> Path:
    """Where ``write_demo_lot`` writes which images of ``folder`` are defective: beside the folder, not in it."""
    folder = Path(folder)
    return folder.parent / f"{folder.name}.truth.json"


def write_demo_lot(out: str | Path, n_images: int = 24, n_defective: int = 4, size: int = 256,
                   seed: int = 7) -> Path:
    """Write the lot as PNGs into ``out`` and its truth (image name -> defect or "good") to ``truth_path(out)``;
    returns the folder."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    defective = set(rng.choice(n_images, size=n_defective, replace=False).tolist())
    truth = {}
    for i in range(n_images):
        defect = DEFECTS[len([j for j in defective if j < i]) % len(DEFECTS)] if i in defective else None
        name = f"washer_{i:03d}.png"
        washer(rng, size, defect).save(out / name)
        truth[name] = defect or "good"
    truth_path(out).write_text(json.dumps(truth, indent=1))
    (out / "truth.json").unlink(missing_ok=True)  # where an older version wrote it: the lot's folder holds images only
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m client.demo_lot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/demo_lot")
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--defective", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args(argv)
    folder = write_demo_lot(args.out, args.images, args.defective, args.size)
    print(f"wrote {args.images} images ({args.defective} defective) to {folder}; which are defective: "
          f"{truth_path(folder)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
