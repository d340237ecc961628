"""benchmarks/line.py's rules without a server: the decision method, image score and tail estimator it chooses,
the oracle's threshold, the tail's shape, the lowest-group reading and the map's peaks (the shifts that are built
and scored through a server are in test_line_benchmark.py)."""

import math

import numpy as np
import pytest

from benchmarks import line


def rows(fa, recall, n=100_000, hits=None):
    """A candidate's results: the same false-alarm multiple of the budget and recall at every budget."""
    return {b: {0.05: {"new_false_alarm_rate": fa * b, "new_recall": recall, "new_good": n, "hits": hits or {}}}
            for b in line.BUDGETS}


def test_the_method_is_the_one_that_spends_the_budget_inside_the_band():
    a, b, c, d = "quartile_exponential", "mad", "lower_half", "upper_quartile"
    candidates = {("s", a): rows(1.0, 0.3), ("s", b): rows(3.0, 0.9), ("s", c): rows(1.6, 0.5),
                  ("s", d): rows(0.4, 0.6), ("t", "lower_half"): rows(1.0, 0.99)}
    assert line.choose_method(candidates, "s") == a  # b and d lie outside [0.5, 2] x the budget; a spends it best
    assert line.band_miss(candidates[("s", b)]) == pytest.approx(np.log2(1.5), abs=0.05)
    assert line.calibration_error(candidates[("s", c)]) == pytest.approx(np.log2(1.6))
    assert line.choose_method({k: v for k, v in candidates.items() if k[1] in (b, d)}, "s") == d  # the nearer miss
    # a tie in how the budget is spent goes to the method that tolerates more defective parts in a lot
    assert line.choose_method({("s", "lower_half"): rows(1.0, 0.3), ("s", d): rows(1.0, 0.3)}, "s") == "lower_half"
    # a method that tolerates less than a demo-like lot by construction is passed over, however well it spends the
    # budget, while another is there; alone, it is what there is
    sturdy = {("s", "quartile_exponential"): rows(1.5, 0.2)}
    for fragile in ("trimmed_tail", "exponential_tail", "lot_quantile"):
        assert line.choose_method({("s", fragile): rows(1.0, 0.3), **sturdy}, "s") == "quartile_exponential"
    assert line.choose_method({("s", "trimmed_tail"): rows(1.0, 0.3)}, "s") == "trimmed_tail"
    # 0.4x seen at one defect rate on 300 good parts is one false alarm at a 1% budget: noise, not a miss, when
    # the rate pooled over the defect rates lies in the band
    noisy = {b: {0.02: {"new_false_alarm_rate": 0.4 * b, "new_recall": 0.6, "new_good": 300},
                 0.1: {"new_false_alarm_rate": 1.2 * b, "new_recall": 0.6, "new_good": 3000}} for b in line.BUDGETS}
    assert line.band_miss(noisy) == 0.0 and line.band_miss(rows(0.4, 0.6, n=300)) > 0
    assert line.rate_interval(0, 300)[0] == 0.0 and line.rate_interval(300, 300)[1] == 1.0
    # no false alarm among 20 good parts is no rate above the band (half a false alarm, 2.5%, lay past 2 x 1%)
    few = {b: {0.05: {"new_false_alarm_rate": 0.0, "new_recall": 0.5, "new_good": 20},
               0.1: {"new_false_alarm_rate": b, "new_recall": 0.5, "new_good": 100_000}} for b in line.BUDGETS}
    assert line.band_miss(few) == 0.0


def test_the_oracle_threshold_calls_no_more_good_parts_than_the_budget():
    """The interpolated 1 - budget quantile lies below the largest good score: on 19 good parts it called one of
    them (5.3%) at a 1% budget, and the oracle's recall was read at that."""
    good = np.random.default_rng(0).normal(0, 1, 19)
    for budget, allowed in ((0.01, 0), (0.05, 0), (0.1, 1)):
        threshold = line.oracle_threshold(good, budget)
        assert (good > threshold).sum() == allowed
        assert (good >= threshold).sum() == allowed + 1  # the lowest such threshold: one good part more at it
    data = {"labels": [0] * 19 + [1], "splits": [
        {"defect_rate": 0.0, "new": {"indices": list(range(20)), "max": [*good, good.max() - 1e-9]},
         "lot": {"max": []}}]}
    assert line.oracle(data, "max")[0.01][0.0]["new_recall"] == 0.0  # below the best good part: not found


def test_the_shipped_image_score_stays_unless_another_wins_beyond_the_noise():
    """Paired over the defective images: ten images each caught a little more often is no evidence; forty caught
    every time instead of never is."""
    rng = np.random.default_rng(0)
    base = {i: [int(rng.random() < 0.5), 1] for i in range(50)}
    shipped = rows(1.0, 0.5, hits=base)
    slightly = rows(1.0, 0.52, hits={i: [1, 1] if i < 2 else h for i, h in base.items()})
    clearly = rows(1.0, 0.9, hits={i: [1, 1] if i < 45 else h for i, h in base.items()})
    assert line.choose_image_score({"shipped": shipped, "other": slightly}, "shipped") == "shipped"
    assert line.choose_image_score({"shipped": shipped, "other": slightly}) == "other"  # no incumbent: the best
    assert line.choose_image_score({"shipped": shipped, "other": clearly}, "shipped") == "other"
    gain, error = line.recall_gain(clearly, shipped)
    assert gain > 2 * error > 0


def test_the_tail_shape_reads_new_good_parts_in_the_quartile_models_units():
    """An exponential tail above the median is what the quartile model assumes: its shares come out as the model's;
    a bounded tail (uniform) falls below them past the lot, with the same quartiles."""
    rng = np.random.default_rng(0)

    def shift(draw):
        n_new = 4000
        labels = [0] * (400 + n_new)  # lots of 400: quartiles known well enough to test the shares
        splits = [{"lot": {"max": draw(400).tolist(), "indices": list(range(400))},
                   "new": {"max": draw(n_new).tolist(), "indices": list(range(400, 400 + n_new))}} for _ in range(5)]
        return {"labels": labels, "splits": splits}

    exponential = line.tail_shape(shift(lambda n: np.where(rng.random(n) < 0.5, -rng.exponential(1.0, n),
                                                           rng.exponential(1.0, n))), "max")
    for x in (1, 2, 3):
        assert exponential["above"][x] == pytest.approx(0.5 * math.exp(-x), rel=0.25)
    uniform = line.tail_shape(shift(lambda n: rng.random(n)), "max")
    assert uniform["above"][3] < 0.5 * exponential["above"][3]  # a bounded tail past the lot's quartiles
    assert uniform["new_good"] == exponential["new_good"] == 5 * 4000


@pytest.mark.parametrize("budget", [0.01, 0.05])
def test_tail_estimators_beside_the_product(budget):
    """The first estimator is the product's own threshold, the second the quartile model capped at the lot's order
    statistic; leaving out what lies above the quartile model's threshold undoes defects that lifted the quartiles; a
    lot whose upper quarter falls off faster than the exponential gets a lower one."""
    from postprocess.decision import calibrate

    rng = np.random.default_rng(2)
    good = np.sort(rng.exponential(1.0, 200))
    estimators = iter(line.TAIL_ESTIMATORS.values())
    product = calibrate(good, None, budget).threshold
    assert next(estimators)(good, budget) == product
    assert next(estimators)(good, budget) == calibrate(good, None, budget, "quartile_conformal").threshold <= product
    assert line.quartile_model(good, budget) == pytest.approx(product)  # what the censored reading starts from
    small = rng.permutation(good)[:36]  # past the lot at 1% only: the cap carried beyond its largest score
    carried, capped = line.capped_past_the_lot(small, budget), line.capped_threshold(small, budget)
    assert carried <= capped and (carried > small.max() if budget < 1 / 37 else carried == capped)
    lifted = np.concatenate([good, np.full(40, 30.0)])  # a sixth of the lot far above the rest
    assert line.censored_quartile(lifted, budget) < 0.8 * line.quartile_model(lifted, budget)
    assert line.censored_quartile(lifted, budget) == pytest.approx(line.quartile_model(good, budget), rel=0.25)
    assert line.censored_quartile(good, budget) == pytest.approx(product, rel=0.25)
    bounded = rng.uniform(0.0, 1.0, 200)  # the quartile ratio (q87.5 - q75) / (q75 - median) is 1/2
    assert line.shaped_tail(-1.0)(bounded, budget) < 0.9 * line.quartile_model(bounded, budget)
    assert line.shaped_tail(-1.0)(good, budget) == pytest.approx(product, rel=0.2)


def test_the_lowest_group_reading_takes_a_mostly_defective_lot_from_its_good_parts_and_a_clean_lot_whole():
    """A lot three quarters defective, its defects above its good parts' tail (MVTec bottle's test set is one), is
    read from its good parts; a clean lot, or one whose defects are fewer than a sixth, is read whole."""
    rng = np.random.default_rng(4)
    good = 0.05 + rng.exponential(0.004, 20)
    mostly_defective = np.concatenate([good, 0.09 + rng.exponential(0.05, 60)])
    assert line.lower_group_size(mostly_defective) == 20
    assert line.lower_group(mostly_defective, 0.01) == pytest.approx(line.shipped_threshold(good, 0.01))
    assert line.lower_group(mostly_defective, 0.01) < 0.09 < line.shipped_threshold(mostly_defective, 0.01)
    clean = rng.exponential(1.0, 36)
    assert line.lower_group_size(clean) == 36 and line.lower_group(clean, 0.01) == line.shipped_threshold(clean, 0.01)
    few = np.concatenate([good, 0.09 + rng.exponential(0.05, 3)])  # under a sixth: left to the quartile model
    assert line.lower_group_size(few) == len(few)


def test_map_peaks_are_one_per_blob_and_plateau_on_the_patch_grid():
    maps = np.zeros((2, 28, 56), dtype=np.float32)  # 2 x 4 patch cells of 14 pixels
    maps[0, 0:14, 0:28] = 0.5  # one flat blob over two cells: one peak
    maps[0, 20, 50] = 0.9  # a second, in the far cell (not touching the first)
    maps[1, 3, 3] = 0.2
    peaks = line.map_peaks(maps, 14, kept=4)
    assert np.allclose(peaks[0, :2], [0.9, 0.5]) and np.isnan(peaks[0, 2:]).all()
    # the zero cells are one flat top that touches the 0.2 cell: a shelf, no peak
    assert peaks[1, 0] == pytest.approx(0.2) and np.isnan(peaks[1, 1:]).all()
    shelf = np.ones((5, 5), np.float32)  # a 9 on a shelf of 5s over a floor of 1s: one peak, not three
    shelf[1:4, 1:4] = 5.0
    shelf[2, 2] = 9.0
    assert np.allclose(line.map_peaks(np.kron(shelf, np.ones((2, 2), np.float32))[None], 2, kept=3)[0],
                       [9.0, np.nan, np.nan], equal_nan=True)
    with pytest.raises(ValueError, match="raise PEAKS_KEPT"):  # never cut short silently
        line.map_peaks(np.kron(np.diag([1.0, 0.0, 2.0]).astype(np.float32), np.ones((2, 2), np.float32))[None], 2,
                       kept=1)


@pytest.mark.parametrize("budget", [0.01, 0.05])
def test_pooled_peaks_keep_the_budget_when_peaks_are_a_poisson_process(budget):
    """Images whose peaks are a Poisson number of exponential heights: the pooled reading of a lot of 36 puts the
    threshold where the largest peak of a new image passes it with about the budget's probability (over many lots;
    a little more, as for any tail read off 36 images), and four defective images, each with three high peaks, move
    it by less than a quarter."""
    rng = np.random.default_rng(3)

    def images(n):
        peaks = np.full((n, line.PEAKS_KEPT), np.nan)
        for i in range(n):
            heights = np.sort(rng.exponential(1.0, min(rng.poisson(8) + 1, line.PEAKS_KEPT)))[::-1]
            peaks[i, :len(heights)] = heights
        return peaks

    estimator = line.pooled_peaks(1.0)
    new_maxima = images(20000)[:, 0]
    realised = [np.mean(new_maxima > estimator(images(36), budget)) for _ in range(200)]
    assert budget < np.mean(realised) < 1.5 * budget
    lot = images(36)
    defective = lot.copy()
    defective[:4, :3] = 20.0  # four defective images of 36, three high peaks each
    assert estimator(defective, budget) == pytest.approx(estimator(lot, budget), rel=0.25)


def _stream_data(shift: float, seed: int = 0) -> dict:
    """One split: a lot of 36 good scores, 60 new good ones (moved up by ``shift``) and 20 defective ones."""
    rng = np.random.default_rng(seed)
    lot, good, bad = rng.exponential(1.0, 36), rng.exponential(1.0, 60) + shift, rng.exponential(1.0, 20) + 6.0
    labels = [0] * 96 + [1] * 20
    record = {"defect_rate": 0.0, "lot": {"indices": list(range(36)), "max": lot.tolist()},
              "new": {"indices": list(range(36, 116)), "max": np.concatenate([good, bad]).tolist()}}
    return {"labels": labels, "splits": [record]}


def test_the_grown_calibration_reads_each_batch_from_the_lot_and_the_parts_before_it():
    """banks update folds every new part's score into the calibration: the benchmark decides each batch by the
    threshold of the lot and the stream so far; one batch holding the whole stream is the lot's threshold alone."""
    data = _stream_data(0.0)
    whole = line.grown_calibration(data, "max", 0.05, line_rate=0.1, batch=1000)[0.0]
    assert whole["fa_grown"] == whole["fa_lot"] and whole["recall_grown"] == whole["recall_lot"]
    assert whole["pool"] == 36 + 60 + round(0.1 * 60 / 0.9)
    lot_threshold = line.shipped_threshold(np.asarray(data["splits"][0]["lot"]["max"]), 0.05)
    good = np.asarray(data["splits"][0]["new"]["max"][:60])
    assert whole["fa_lot"] == pytest.approx(float((good > lot_threshold).mean()))
    # good parts that score higher than the lot's: the grown calibration learns it, the lot's threshold cannot
    moved = line.grown_calibration(_stream_data(1.5), "max", 0.05, line_rate=0.0, batch=4)[0.0]
    assert moved["fa_grown"] < 0.6 * moved["fa_lot"], moved
    with pytest.raises(SystemExit):  # a share, not a count
        line.main(["grown", "--line-rate", "1.5", "x=y"])
