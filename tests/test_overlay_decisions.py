"""One story per image: an overlay's outline, its colour bar and its caption agree with the decision.

The scores are made the way the scoring model makes them: maps reduced to image scores and re-scored toward the
lot's most similar images (``kernels.neighbour_rescore``), the threshold from the lot (``decision.calibrate``), and
the overlay drawn by the client's own path (``client.infer.add_decisions``, ``caption_for``, ``render_panel``).
Re-scoring is what made the old overlays lie: a part with one hot pixel pulled below the threshold by its
neighbours was decided normal and outlined anyway.
"""

import numpy as np
import pytest

from client.heatmap import OUTLINE_COLOUR, render_panel
from client.infer import add_decisions, caption_for
from postprocess import kernels as K
from postprocess.decision import Decider, calibrate

SIZE = (70, 168)  # a ball screw's 140x336 at half size


def lot_like(n=48, seed=0):
    """Maps of a lot: textured good parts, some with one hot pixel (a pit), some with a larger blotch; embeddings
    that group look-alikes so that re-scoring moves scores."""
    rng = np.random.default_rng(seed)
    maps = rng.gamma(4.0, 0.006, (n, *SIZE)).astype(np.float32)
    for i in range(0, n, 5):  # one-pixel pits: the map's maximum sees them, a bilinear thumbnail may not
        maps[i, rng.integers(5, SIZE[0] - 5), rng.integers(5, SIZE[1] - 5)] += rng.uniform(0.03, 0.12)
    for i in range(2, n, 9):
        maps[i, 20:30, 40:60] += rng.uniform(0.02, 0.08)
    groups = rng.normal(size=(4, 16))
    embeds = (groups[np.arange(n) % 4] + 0.3 * rng.normal(size=(n, 16))).astype(np.float32)
    return maps, embeds


def outlined(picture, width: int, height: int) -> bool:
    pixels = np.asarray(picture)
    heat = pixels[-height - 8:-8, width + 4: 2 * width + 4]  # the second panel: under the caption, right of the image
    return bool(np.all(heat == OUTLINE_COLOUR, axis=-1).any())


@pytest.mark.parametrize("image_score", ["max", "topk_mean"])
@pytest.mark.parametrize("user_quantile", [None, 0.5, 0.85])
def test_outlines_appear_exactly_on_images_decided_anomalous(image_score, user_quantile):
    """The automatic threshold, and a user's --threshold (on the calibrated scale) at the lot's median and 85th
    percentile score."""
    maps, embeds = lot_like()
    own = K.image_scores(maps, image_score, 0.01)
    scores = K.neighbour_rescore(own, embeds, embeds, own, 5, 0.5, np.arange(len(maps)))
    info = {"decision": calibrate(scores, false_alarm_rate=0.2).to_dict(),
            "config": {"image_score": image_score, "image_topk_fraction": 0.01, "rescore_k": 5,
                       "rescore_weight": 0.5}}
    user_threshold = None
    if user_quantile is not None:
        user_threshold = float(Decider.for_bank(info).calibration.calibrated(np.quantile(scores, user_quantile)))
    decider = Decider.for_bank(info, threshold_calibrated=user_threshold)
    rows = [{"path": f"part-{i}.png", "score": float(s)} for i, s in enumerate(scores)]
    levels = add_decisions(rows, decider, maps)
    image = np.full((*SIZE, 3), 128, np.uint8)
    contradictions = []
    spots_on_normal = 0
    for row, amap, level in zip(rows, maps, levels):
        spots_on_normal += row["decision"] == "normal" and amap.max() > decider.raw_threshold
        picture = render_panel(image, amap, 0.0, 0.15, caption_for(row["path"], row, level), max_side=84)
        if outlined(picture, 84, 35) != (row["decision"] == "anomalous"):
            contradictions.append((row["path"], row["decision"], float(amap.max()), level))
    assert not contradictions
    decisions = [r["decision"] for r in rows]
    assert "anomalous" in decisions and "normal" in decisions
    if image_score == "max" and user_threshold is None:
        assert spots_on_normal  # the case the old overlays got wrong is in the lot


def test_the_colour_bar_marks_a_threshold_above_the_scale():
    amap = np.zeros((40, 60), np.float32)
    from client.heatmap import Caption

    calm = np.asarray(render_panel(np.full((40, 60, 3), 128, np.uint8), amap, 0.0, 1.0,
                                   Caption("x", 0.1, 0.2, "normal", threshold=3.0), max_side=0))
    bare = np.asarray(render_panel(np.full((40, 60, 3), 128, np.uint8), amap, 0.0, 1.0,
                                   Caption("x", 0.1, 0.2, "normal", threshold=None), max_side=0))
    assert calm.shape[1] > bare.shape[1]  # the label "3 threshold (above the scale)" widens the bar
    assert not outlined(calm, 60, 40)


def test_a_name_with_a_newline_keeps_to_its_line_of_the_caption():
    """A newline in a file name drew the name's second line over the decision line: it is written as \\n."""
    from client.heatmap import Caption

    def drawn(name):
        return np.asarray(render_panel(np.full((120, 160, 3), 128, np.uint8), np.zeros((120, 160), np.float32), 0.0,
                                       1.0, Caption(name, 0.1, 0.2, "normal"), max_side=0))

    assert np.array_equal(drawn("new\nline.png"), drawn("new\\nline.png"))
    assert not np.array_equal(drawn("new\nline.png"), drawn("newline.png"))


def test_the_consoles_list_of_the_worst_images_keeps_a_name_with_a_newline_on_its_line(capsys):
    """The caption wrote a newline in a name as \\n; the console's list of the worst images broke its line there."""
    from client.infer import print_summary

    rows = [{"rank": 1, "score": 0.5, "calibrated": 0.9, "decision": "anomalous", "path": "new\nline.png"}]
    print_summary(rows, [], [])
    listed = capsys.readouterr().err.splitlines()[-1]
    assert listed.endswith("new\\nline.png") and "anomalous" in listed


def test_the_colour_bar_is_hot_at_the_top_and_ticks_the_threshold_at_its_height_on_the_scale():
    """The bar reads top (high) to bottom (low): a threshold at 0.75 on a 0..1 scale is a quarter of the way down,
    and the top row is the colour table's hottest colour. A flipped ramp or a tick measured from the bottom would
    mark the threshold where the map's colours say something else."""
    from client.heatmap import BAR_WIDTH, _colour_bar, _font, colour_table

    height = 201
    bar = np.asarray(_colour_bar(height, 0.0, 1.0, 0.75, _font(10)))
    ramp = bar[:, :BAR_WIDTH]
    ticks = [y for y in range(height) if np.all(ramp[y] == 0)]  # black tick lines across the whole ramp
    inner = [y for y in ticks if 0 < y < height - 1]  # the ends carry the high and low labels
    assert inner and all(abs(y - 0.25 * (height - 1)) <= 2 for y in inner)
    table = colour_table().astype(int)

    def place(colour):  # where on the colour table (0 cold .. 255 hot) a colour of the ramp lies
        return int(np.argmin(np.abs(table - colour.astype(int)).sum(axis=1)))

    # rows 0 and height-1 carry the ticks of the high and low labels: the rows next to them
    assert place(ramp[1, 0]) >= 250 and place(ramp[height - 2, 0]) <= 5


@pytest.mark.parametrize("threshold", [1.0005, 1.5, 0.9999, 0.5, 0.0001, -0.2, 0.0, 1.0, 1.0004, -0.0004, None])
def test_the_colour_bars_texts_never_overlap_and_the_ends_keep_their_ticks(threshold):
    """A threshold near the bottom of the scale printed its text over the scale's lowest value ("0.00045threshold");
    one above or below the scale is written beside the end label, not over it."""
    from client.heatmap import bar_labels

    size, height = 12, 200
    labels = bar_labels(height, 0.0, 1.0, threshold, size)
    assert [y for y, _, _ in labels][:2] == [0, height - 1]  # both ends keep their ticks
    tops = sorted(top for _, top, text in labels if text)
    assert all(b - a > size for a, b in zip(tops, tops[1:]))  # text rows apart: none drawn over another
    if threshold is not None and not -0.001 <= threshold <= 1.001:  # beyond an end: both end values written
        assert sum(bool(text) for _, _, text in labels) == 3
        assert "the scale)" in labels[-1][2]
    elif threshold is not None and not 0.01 < threshold < 0.99:  # at or near an end: its own value for it
        assert sum(bool(text) for _, _, text in labels) == 2
        # on the scale (a run's scale ends at its threshold; an image's level may lie a rounding past it)
        assert "the scale" not in labels[-1][2] and 0 <= labels[-1][0] <= height - 1


def test_the_runs_colour_scale_reaches_the_threshold_so_that_only_the_decisions_level_is_hottest():
    """A bank's scale ends at its lot's typical maps' 99.9th percentile, which every good map's hottest pixels
    reach: drawn on it, a normal part showed red spots below a threshold far above the scale (the demo: scale
    0.011-0.037, threshold 0.066). The run's scale ends at the threshold where that lies higher."""
    from client.heatmap import colorize
    from client.infer import colour_range

    lot = np.r_[np.linspace(0.030, 0.045, 30), 0.2]
    info = {"decision": calibrate(lot).to_dict(), "config": {}}
    decider = Decider.for_bank(info)
    low, high = colour_range((0.011, 0.037), decider)
    assert (low, high) == (0.011, decider.raw_threshold) and high > 0.045
    good_peak, defect = colorize(np.array([[0.045, 0.25]]), low, high)[0]
    top = colorize(np.array([[high]]), low, high)[0, 0]
    assert not np.array_equal(good_peak, top) and np.array_equal(defect, top)
    assert colour_range((0.011, 0.5), decider) == (0.011, 0.5)  # a scale above the threshold stays
    assert colour_range((0.011, 0.037), None) == (0.011, 0.037)  # no calibration: the bank's
    by_hand = Decider.for_bank(info, threshold_calibrated=0.9)  # a threshold given by hand is the one drawn
    assert colour_range((0.011, 0.037), by_hand)[1] == pytest.approx(by_hand.raw_threshold)
