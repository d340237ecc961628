"""Metrics against cases worked out by hand."""

import numpy as np
import pytest

from benchmarks.metrics import f1_at_prevalence, f1_max, image_metrics, mean_metrics, pixel_metrics, pro_score


def test_image_metrics_hand_case():
    # pairs (defective > good): 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3 of 4
    m = image_metrics([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert m["image_auroc"] == pytest.approx(0.75)
    # ranked 0.8(+) 0.4(-) 0.35(+): precision 1 at recall 1/2, 2/3 at recall 1
    assert m["image_ap"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # best threshold 0.35: P = 2/3, R = 1 -> F1 = 0.8
    assert m["image_f1_max"] == pytest.approx(0.8)


def test_f1_max_perfect_and_one_class_is_none():
    assert f1_max([0, 1, 1], [0.1, 0.5, 0.9]) == pytest.approx(1.0)
    assert image_metrics([1, 1], [0.2, 0.3])["image_auroc"] is None


def test_a_lot_or_masks_with_no_defect_have_no_metric():
    """AUROC, AP, F1 and PRO compare defective with good: with only good images (or no defective pixel) there is
    nothing to compare, and each metric is None (left out of the means), not an error or a made-up number."""
    assert image_metrics([0, 0, 0], [0.1, 0.5, 0.9]) == {k: None for k in image_metrics([0, 1], [0, 1])}
    none = pixel_metrics(np.zeros((2, 3, 3), bool), np.random.default_rng(0).random((2, 3, 3)))
    assert none and all(v is None for v in none.values())
    assert set(none) == set(pixel_metrics(np.eye(3, dtype=bool)[None], np.eye(3)[None]))


def test_f1_at_a_lines_prevalence_counts_false_alarms_on_the_good_parts_only():
    """At a 2% defect rate, 1% false alarms and 80% recall: of 1000 parts 16 defects are caught and 9.8 of the 980
    good ones are flagged, so precision is 16 / 25.8 and F1 = 2PR / (P + R)."""
    precision = 0.8 * 0.02 / (0.8 * 0.02 + 0.01 * 0.98)
    expected = 2 * precision * 0.8 / (precision + 0.8)
    assert f1_at_prevalence(false_alarm_rate=0.01, recall=0.8, prevalence=0.02) == pytest.approx(expected, rel=1e-12)


def test_pro_one_region():
    masks = np.array([[[1, 1, 0], [0, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.5, 0.7], [0.1, 0.2, 0.3]]])
    # curve: (0, .5) -> (.25, .5) -> (.25, 1) -> (.5, 1); area to .3 = .25*.5 + .05*1 = .175
    assert pro_score(masks, maps) == pytest.approx(0.175 / 0.3)


def test_pro_averages_over_regions_not_pixels():
    masks = np.array([[[1, 0, 1, 1, 1, 0, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.1, 0.8, 0.25, 0.15, 0.3, 0.05, 0.02]]])
    # regions of 1 and 3 pixels: pro .5, .667 at fpr 0; .833, 1 at fpr .25
    assert pro_score(masks, maps) == pytest.approx((0.25 * 2 / 3 + 0.05 * 1.0) / 0.3)


def test_pro_uses_eight_connectivity():
    masks = np.array([[[1, 0, 0], [0, 1, 1], [0, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.5, 0.4], [0.3, 0.04, 0.03], [0.2, 0.1, 0.05]]])
    # one diagonal-joined region of 3 pixels: 1/3 of it found before any false positive
    assert pro_score(masks, maps) == pytest.approx(1 / 3)


def test_pixel_metrics_hand_case():
    masks = np.array([[[1, 0], [0, 0]], [[0, 0], [0, 1]]], dtype=bool)
    maps = np.array([[[0.9, 0.2], [0.1, 0.3]], [[0.4, 0.0], [0.05, 0.35]]])
    m = pixel_metrics(masks, maps)
    # positives .9 and .35; negatives .2 .1 .3 .4 0 .05: .9 beats 6, .35 beats 5 -> 11/12
    assert m["pixel_auroc"] == pytest.approx(11 / 12)
    # ranked .9(+) .4(-) .35(+): AP = .5*1 + .5*2/3
    assert m["pixel_ap"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert m["pixel_f1_max"] == pytest.approx(0.8)
    # two 1-pixel regions: .9 finds one at fpr 0 (pro .5), .35 the other after one negative (.4: fpr 1/6)
    assert m["pro"] == pytest.approx((0.5 * (1 / 6) + 1.0 * (0.3 - 1 / 6)) / 0.3)


def test_pro_merges_tied_scores_into_one_threshold():
    # a constant map is one threshold: the curve goes straight from (0, 0) to (1, 1); its area to 0.3 is
    # 0.3 * 0.3 / 2, i.e. 0.15 once normalised, whatever order the tied pixels are stored in
    masks = np.zeros((2, 4, 4), bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 0, 0] = True
    assert pro_score(masks, np.full(masks.shape, 0.7)) == pytest.approx(0.15)
    assert pro_score(masks[::-1], np.full(masks.shape, 0.7)) == pytest.approx(0.15)


def test_pro_interpolates_the_segment_that_crosses_the_limit():
    # one region of two pixels, three negatives; the second region pixel ties with a negative at 0.6:
    # (0, 0) -> (0, .5) [0.9] -> (1/3, 1) [0.6, tie] -> (2/3, 1) -> (1, 1). At fpr 0.3 the curve is on the
    # sloped segment: pro = .5 + .5 * 0.3 / (1/3) = .95, area = 0.3 * (.5 + .95) / 2.
    masks = np.array([[[1, 1, 0, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.6, 0.6, 0.4, 0.1]]])
    assert pro_score(masks, maps) == pytest.approx(0.3 * (0.5 + 0.95) / 2 / 0.3)


def test_mean_skips_missing():
    m = mean_metrics({"a": {"image_auroc": 0.8, "pro": None}, "b": {"image_auroc": 0.6, "pro": 0.5}})
    assert m["image_auroc"] == pytest.approx(0.7)
    assert m["pro"] == pytest.approx(0.5)
    assert m["pixel_ap"] is None


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_metrics(np.zeros((1, 2, 2), bool), np.zeros((1, 3, 3)))
