"""The in-process pipeline with the tiny random CLIP (text present): stages, caching, and bad lots."""

import numpy as np
import pytest

from postprocess.config import PAClipConfig
from postprocess.pipeline import LotScorer, prompts_for, score_lot


@pytest.fixture(scope="module")
def tiny(tiny_clip):
    return tiny_clip


@pytest.fixture(scope="module")
def lot():
    rng = np.random.default_rng(0)
    images = np.full((8, 56, 56, 3), 128, np.uint8) + rng.integers(0, 30, (8, 56, 56, 3), dtype=np.uint8)
    images[5, 20:34, 20:34] = 255  # one odd image
    return images


def test_prompts():
    assert prompts_for("metal_nut") == ["a photo of a normal metal nut", "a photo of a defective metal nut"]


def test_full_method_with_text(tiny, lot):
    report = score_lot(tiny, lot, "widget", progress=False)
    assert report.maps.shape == (8, 56, 56) and report.maps.dtype == np.float32
    assert report.scores.shape == (8,) and np.isfinite(report.scores).all()
    assert report.info["normal_selection"] == "text"
    assert len(report.normal_indices) == 2  # 10% of 8, at least 2
    assert report.info["n_augmented"] == 2 * PAClipConfig().n_augment
    assert set(report.info["tau_b"]) == {"1", "3", "5"}


def test_modes_share_stage_one_and_augmentations(tiny, lot):
    scorer = LotScorer(tiny, lot, "widget", progress=False)
    reports = {m: scorer.score(PAClipConfig.for_mode(m)) for m in ("mutual", "pad", "pad_pam", "pad_mpam")}
    assert len(scorer._states) == 1 and len(scorer._normal_sets) == 1
    assert not np.allclose(reports["mutual"].maps, reports["pad_mpam"].maps)
    text_only = scorer.score(PAClipConfig.for_mode("baseline"))
    assert len(scorer._states) == 2 and np.isfinite(text_only.maps).all()
    # the odd image stands out to its peers
    assert int(np.argmax(reports["mutual"].scores)) == 5


def test_bad_lots(tiny, lot):
    with pytest.raises(ValueError, match="at least 2 images"):
        LotScorer(tiny, lot[:1], "widget", progress=False)
    with pytest.raises(ValueError, match="at least 2 different images, got 3 copies of one"):
        LotScorer(tiny, np.repeat(lot[:1], 3, axis=0), "widget", progress=False)
    with pytest.raises(ValueError, match="uint8"):
        LotScorer(tiny, lot.astype(np.float32), "widget", progress=False)
    with pytest.raises(ValueError, match="unknown mode"):
        PAClipConfig.for_mode("fancy")
    with pytest.raises(ValueError, match="alpha"):
        PAClipConfig(alpha=2.0)


def test_rescoring_rows_share_one_finish_stage_and_equal_a_fresh_scorer(tiny, lot):
    from postprocess import kernels as K

    scorer = LotScorer(tiny, lot, "widget", progress=False)
    plain = scorer.score(PAClipConfig(rescore_k=0))
    first = scorer._finished[next(iter(scorer._finished))]
    rescored = scorer.score(PAClipConfig(rescore_k=3, rescore_weight=0.7))
    assert scorer._finished[next(iter(scorer._finished))] is first  # the maps were not computed again
    np.testing.assert_array_equal(rescored.maps, plain.maps)
    want = K.neighbour_rescore(plain.scores, scorer.features.image_embeds, scorer.features.image_embeds,
                               plain.scores, 3, 0.7, np.arange(len(lot)))
    np.testing.assert_allclose(rescored.scores, want, rtol=1e-6)
    fresh = LotScorer(tiny, lot, "widget", progress=False).score(PAClipConfig(rescore_k=3, rescore_weight=0.7))
    np.testing.assert_allclose(fresh.scores, rescored.scores, rtol=1e-6)
    assert "3 most similar lot images" in rescored.info["image_rescoring"] and plain.info["image_rescoring"] == "off"
    # a finish-stage setting is not served from the cache
    other = scorer.score(PAClipConfig(alpha=0.9, rescore_k=0))
    assert not np.allclose(other.maps, plain.maps)
    np.testing.assert_array_equal(scorer.score(PAClipConfig(rescore_k=0)).scores, plain.scores)
