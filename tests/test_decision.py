"""postprocess/decision.py: thresholds and calibrated scores from a lot's own scores."""

import math

import numpy as np
import pytest

from postprocess.decision import (METHODS, Calibration, DecisionError, calibrate, check_false_alarm_rate,
                                  decide)


def line_lot(n_good=2000, defect_rate=0.03, seed=0):
    """Good parts ~ N(0.05, 0.005); defective ones well above, as a line's lot."""
    rng = np.random.default_rng(seed)
    good = rng.normal(0.05, 0.005, n_good)
    bad = rng.normal(0.09, 0.01, int(n_good * defect_rate / (1 - defect_rate)))
    return good, bad


@pytest.mark.parametrize("method", ["lower_half", "mad", "upper_quartile"])
@pytest.mark.parametrize("rate", [0.01, 0.05])
def test_the_false_alarm_budget_holds_on_gaussian_good_parts_with_defects_in_the_lot(method, rate):
    good, bad = line_lot()
    cal = calibrate(np.r_[good, bad], false_alarm_rate=rate, method=method)
    observed = float((good > cal.threshold).mean())
    assert 0.4 * rate <= observed <= 2.0 * rate, (method, rate, observed)
    assert (bad > cal.threshold).mean() > 0.9


@pytest.mark.parametrize("method", ["exponential_tail", "quartile_exponential"])
@pytest.mark.parametrize("rate", [0.01, 0.05])
def test_the_exponential_tail_holds_the_budget_on_right_skewed_good_parts(method, rate):
    """Good parts' scores with an exponential upper tail (as real lots' lean right): the Gaussian methods call far
    more than the budget defective, the tail model about the budget."""
    rng = np.random.default_rng(1)
    good = 0.13 + rng.exponential(0.01, 4000)
    bad = rng.normal(0.3, 0.02, 120)
    lot = np.r_[good, bad]
    tail = calibrate(lot, false_alarm_rate=rate, method=method)
    observed = float((good > tail.threshold).mean())
    assert 0.4 * rate <= observed <= 1.5 * rate, observed  # an exponential tail: the model holds
    assert (good > calibrate(lot, false_alarm_rate=rate, method="lower_half").threshold).mean() > 2 * rate
    assert (bad > tail.threshold).mean() > 0.9
    assert tail.calibrated(tail.threshold) == pytest.approx(0.5)


def test_the_quartile_exponential_survives_a_lot_a_sixth_defective_where_the_tail_model_breaks():
    """An eighth of the lot defective or more fills the top quartile that exponential_tail reads."""
    rng = np.random.default_rng(2)
    good = 0.03 + rng.exponential(0.003, 200)
    bad = rng.normal(0.1, 0.01, 40)  # 17% of the lot, like the demo lot
    lot = np.r_[good, bad]
    quartiles = calibrate(lot, method="quartile_exponential")
    assert (bad > quartiles.threshold).mean() > 0.9 and (good > quartiles.threshold).mean() <= 0.02
    assert (bad > calibrate(lot, method="exponential_tail").threshold).mean() < 0.5


def test_the_lower_half_ignores_the_defects_tail():
    """Half the lot far above: the lower half still sees only the good parts' spread."""
    good, _ = line_lot(n_good=1000)
    cal = calibrate(np.r_[good, np.full(400, 5.0)], method="lower_half")
    assert cal.spread < 0.02
    mad = calibrate(np.r_[good, np.full(400, 5.0)], method="mad")
    assert mad.spread > cal.spread


def test_normal_images_method_uses_the_chosen_images():
    scores = np.r_[np.full(5, 0.05) + np.arange(5) * 0.001, np.full(5, 1.0)]
    cal = calibrate(scores, normal_indices=[0, 1, 2, 3, 4], method="normal_images")
    assert cal.centre == pytest.approx(0.052) and cal.threshold < 0.1


def test_calibrated_scores_put_the_threshold_at_one_half_and_survive_the_manifest():
    good, bad = line_lot()
    cal = calibrate(np.r_[good, bad])
    assert cal.calibrated(cal.threshold) == pytest.approx(0.5)
    assert cal.calibrated(cal.threshold + cal.spread) == pytest.approx(1 / (1 + math.exp(-1)))
    c = cal.calibrated(np.r_[good, bad])
    assert ((c > 0.5) == (np.r_[good, bad] > cal.threshold)).all() and ((0 <= c) & (c <= 1)).all()
    again = Calibration.from_dict(cal.to_dict())
    assert again == cal and again.to_dict()["threshold"] == cal.threshold
    assert cal.with_rate(0.001).threshold > cal.threshold > cal.with_rate(0.2).threshold


def test_degenerate_lots_still_calibrate_and_bad_input_is_refused():
    same = calibrate(np.full(10, 0.3))
    assert same.spread > 0 and same.threshold > 0.3
    assert decide(same.calibrated([0.3, 0.5, float("nan")])) == ["normal", "anomalous", "invalid"]
    with pytest.raises(DecisionError, match="at least 2"):
        calibrate([0.1, float("nan")])
    with pytest.raises(DecisionError, match="unknown decision method"):
        calibrate([0.1, 0.2], method="oracle")
    for rate in (0, 0.5, -0.1, float("nan"), float("inf")):
        with pytest.raises(DecisionError, match="between 0 and 0.5"):
            check_false_alarm_rate(rate)
    assert set(METHODS) == {"lower_half", "mad", "upper_quartile", "exponential_tail", "quartile_exponential",
                            "normal_images"}
