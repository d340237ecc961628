"""benchmarks/ood.py: banks on lots of one product, scored against its own new parts, another product and synthetic
camera faults; the report's tables and choice (tiny model, synthetic parts)."""

from benchmarks import ood
from conftest import make_mvtec_tree
from postprocess.ood import STATISTICS


def test_collect_and_report_on_two_sets(repository, tmp_path, capsys):
    one = make_mvtec_tree(tmp_path / "one", n_good=14, n_bad=4, size=112) / "widget"
    two = make_mvtec_tree(tmp_path / "two", n_good=14, n_bad=4, size=112, seed=1) / "widget"
    for data, other, out in ((one, two, "a"), (two, one, "b")):
        assert ood.main(["collect", "--data", str(data), "--others", str(other), "--repository", str(repository),
                         "--out", str(tmp_path / out), "--lot-size", "8", "--splits", "1"]) == 0
    capsys.readouterr()
    assert ood.main(["report", "--tune", f"A={tmp_path / 'a'}", "--report", f"B={tmp_path / 'b'}"]) == 0
    text = capsys.readouterr().out
    assert "chosen on A:" in text and "reported on B" in text and "chosen on B:" in text
    blocks = [[line for line in block.splitlines() if line.startswith("| ")] for block in text.split("\n\n")]
    tables = [block for block in blocks if block]
    drift = [t for t in tables if "drift alarm" in t[0]]
    assert len(drift) == 2 and all("per image: out of distribution" in t[0] for t in drift)
    assert any(row.startswith("| line at 5% defective |") for row in drift[0])
    tables = tables[0]
    header = tables[0].strip("|").split("|")
    # one cell per statistic and per union: a union is written with "+", never with a "|" that splits its cell
    assert all(s in " ".join(header) for s in (*STATISTICS, *ood.EMBEDDING_STATISTICS))
    assert any(" + " in cell for cell in header)
    for row in tables[1:]:
        assert len(row.strip("|").split("|")) == len(header), row
    groups = {row.split("|")[1].strip() for row in tables[1:]}
    assert {"new good", "new defective", "fault: black frame", "fault: shifted a quarter"} <= groups


def test_embedding_statistics_leave_the_lots_own_image_out_and_see_a_moved_frame():
    """The lot compared with itself is never at distance 0 (its own image left out); a quarter shift moves the
    position-aware grid statistic more than the whole-image one is moved by it."""
    import numpy as np

    from postprocess.contract import Features

    rng = np.random.default_rng(0)
    n, gh, gw, c = 6, 8, 8, 16
    base = rng.normal(size=(1, 1, gh, gw, c)) + 0.1 * rng.normal(size=(n, 1, gh, gw, c))
    lot = Features(base.reshape(n, 1, gh * gw, c), np.zeros((n, gh * gw, 4)), base.mean(axis=(1, 2, 3)), (gh, gw))
    shifted_tokens = np.roll(base, gw // 4, axis=3)
    shifted = Features(shifted_tokens.reshape(n, 1, gh * gw, c), np.zeros((n, gh * gw, 4)),
                       shifted_tokens.mean(axis=(1, 2, 3)), (gh, gw))
    lot_d = ood.image_descriptors(lot)
    own = ood.embedding_statistics(lot_d, lot_d, own=True)
    assert min(own["grid_nn"]) > 1e-4 and min(own["embedding_nn"]) > 1e-6
    moved = ood.embedding_statistics(ood.image_descriptors(shifted), lot_d)
    assert min(moved["grid_nn"]) > 10 * max(own["grid_nn"])


def test_drift_windows_alarm_on_a_moved_line_and_skip_groups_smaller_than_a_window():
    import numpy as np

    rng = np.random.default_rng(1)

    def values(n, gain=1.0):
        return {"map_q75": list(rng.normal(0.1, 0.01, n)), "brightness": list(gain * rng.uniform(52, 216, n)),
                "contrast": list(rng.uniform(10, 50, n))}

    data = {"splits": [{"groups": {"lot": values(36), "new good": values(46), "new defective": values(10),
                                   "fault: brightness x0.5": values(46, 0.5)}} for _ in range(2)]}
    alarms = ood.drift_alarms(data, ("map_q75", "brightness", "contrast"), window=32, draws=10)
    assert alarms["fault: brightness x0.5"] == 1.0 and alarms["new good"] <= 0.1
    # 10 defective parts cannot make a window of 32, and a line at 5% needs 2 of them with 30 good ones
    assert "new defective" not in alarms and alarms["line at 5% defective"] <= 0.1
    assert ood.drift_alarms(data, ("map_q75",), window=32, draws=10)["fault: brightness x0.5"] <= 0.1


def test_capture_counts_defective_images_photographed_outside_the_good_ones(tmp_path, capsys):
    """Two defective images darkened as a whole (a lamp, not a defect) lie outside the good images' brightness range;
    the others, whose blobs darken them a little, lie inside a range widened by three darker good images."""
    import numpy as np
    from PIL import Image

    cat = make_mvtec_tree(tmp_path / "data", n_good=8, n_bad=6, size=96) / "widget"

    def scale(path, factor):
        pixels = np.asarray(Image.open(path), dtype=np.float32) * factor
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)

    for path in sorted((cat / "test/good").glob("*.png"))[:3]:
        scale(path, 0.9)
    for path in sorted((cat / "test/scratch").glob("*.png"))[:2]:
        scale(path, 0.6)
    assert ood.main(["capture", "--data", str(cat), "--size", "96"]) == 0
    text = capsys.readouterr().out
    (brightness,) = [line for line in text.splitlines() if line.startswith("| brightness |")]
    assert "| 2 of 6 |" in brightness, brightness
    assert "defect area (share of the image, from the masks)" in text and "Spearman" in text


def test_the_rule_breaks_a_tie_on_the_worst_group_by_the_next_worst_and_keeps_its_own_parts_limit():
    own = {"new good": 0.01, "new defective": 0.02}
    rates = {"listed first": {**own, "shift": 0.68, "darker": 0.015, "brighter": 0.05},
             "higher next-worst": {**own, "shift": 0.46, "darker": 0.015, "brighter": 0.09},
             "loud": {**own, "new defective": 0.12, "shift": 0.99, "darker": 0.9, "brighter": 0.9}}
    assert ood.choose_from(rates, 0.05) == "higher next-worst"  # tied at 1.5%; then 9% against 5%
    rates["listed first"]["darker"] = 0.016
    assert ood.choose_from(rates, 0.05) == "listed first"
    assert ood.choose_from(rates, 0.2) == "loud"


def test_lookalikes_prints_a_row_per_descriptor_and_catches_a_lamp_where_the_lot_is_lit_alike(repository, tmp_path,
                                                                                                capsys):
    """Synthetic parts all lit alike: a darkened part is outside the lot's brightness, whatever its look-alikes."""
    data = make_mvtec_tree(tmp_path / "data", n_good=14, n_bad=4, size=112) / "widget"
    assert ood.main(["lookalikes", "--data", str(data), "--repository", str(repository), "--lot-size", "8",
                     "--splits", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header, body = rows[0].strip("|").split("|"), rows[1:]
    assert [r.split("|")[1].strip() for r in body] == list(ood.EMBEDDING_STATISTICS)
    for row in body:
        cells = row.strip("|").split("|")
        assert len(cells) == len(header)
        assert cells[header.index(" fault: brightness x0.5 ")].strip() == "100.0%", row
