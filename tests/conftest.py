import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"


def make_mvtec_tree(root: Path, n_good=6, n_bad=4, size=96, seed=0) -> Path:
    """A small MVTec-layout category: textured squares, defects are dark blobs with masks."""
    rng = np.random.default_rng(seed)
    cat = root / "widget"
    for sub in ("test/good", "test/scratch", "ground_truth/scratch"):
        (cat / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_good + n_bad):
        base = np.full((size, size, 3), 170, np.uint8) + rng.integers(0, 20, (size, size, 3), dtype=np.uint8)
        img = Image.fromarray(base)
        if i < n_good:
            img.save(cat / "test/good" / f"{i:03d}.png")
            continue
        mask = Image.new("L", (size, size), 0)
        x, y = rng.integers(10, size - 30, 2)
        ImageDraw.Draw(img).ellipse([x, y, x + 18, y + 18], fill=(20, 20, 20))
        ImageDraw.Draw(mask).ellipse([x, y, x + 18, y + 18], fill=255)
        img.save(cat / "test/scratch" / f"{i:03d}.png")
        mask.save(cat / "ground_truth/scratch" / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def mvtec_tree(tmp_path):
    return make_mvtec_tree(tmp_path / "data")
