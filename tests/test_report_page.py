"""OUT/report.html in a real browser (Debian's headless Chromium): it loads with no error and shows every image."""

import json
import shutil
import subprocess

import numpy as np
import pytest

from client.heatmap import Caption, save_panel
from client.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(*args, profile) -> subprocess.CompletedProcess:
    """Headless Chromium as this closed network needs it (no background connections, a fresh profile)."""
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=10000", *args], capture_output=True, text=True, timeout=120)


def lot_report(out, n=6):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        image = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        amap = rng.random((24, 32)).astype(np.float32) * (0.5 + i / n)
        score = float(amap.max())
        decision = "anomalous" if score > 1.0 else "normal"
        overlay = save_panel(out / "overlays" / f"part_{i}.png", image, amap, 0.0, 1.2,
                             caption=Caption(f"part_{i}.png", score, score / 2, decision, 1.0))
        rows.append({"path": f"lot/part_{i}.png", "score": score, "calibrated": score / 2, "decision": decision,
                     "overlay": str(overlay.relative_to(out))})
    rows.sort(key=lambda r: -r["score"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    skipped = [{"path": "lot/broken.png", "error": "cannot identify image file"}]
    return write_report(out, "PA-CLIP: 6 images against bank 'widget'", rows, skipped, [], 1.0, "scored 6 images"), rows


def test_the_report_page_lists_the_images_worst_first(tmp_path):
    page, rows = lot_report(tmp_path)
    text = page.read_text()
    positions = [text.index(row["path"]) for row in rows]
    assert positions == sorted(positions)  # worst first
    assert text.count('class="thumb"') == 6 and 'href="overlays/part_' in text
    assert "Not scored (1)" in text and "cannot identify image file" in text
    assert "data:image/png;base64," in text  # the histogram travels with the page


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install chromium; run.sh "
                                             "setup tries it)")
def test_the_report_page_renders_in_chromium_without_errors(tmp_path):
    page, _ = lot_report(tmp_path / "out")
    dom = chromium("--dump-dom", page.as_uri(), profile=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-thumbnails-shown="6"' in dom.stdout, dom.stdout[:500]
    assert "data-errors" not in dom.stdout and "Uncaught" not in dom.stderr
    shot = tmp_path / "out" / "report.png"
    picture = chromium(f"--screenshot={shot}", "--window-size=1280,1400", page.as_uri(),
                       profile=tmp_path / "profile2")
    assert picture.returncode == 0 and shot.stat().st_size > 10_000, picture.stderr[-2000:]
    (tmp_path / "out" / "checked.json").write_text(json.dumps({"screenshot": str(shot)}))


def test_file_names_are_escaped_in_the_cards_and_in_the_not_scored_table(tmp_path):
    """A file name is the user's text, not markup: '<b>x</b>.png' must show as that name, not as bold 'x',
 both in a scored image's card and in the list of images not scored."""
    from client.report import render

    rows = [{"path": "lot/<b>x</b>.png", "score": 0.5, "decision": "normal", "rank": 1}]
    skipped = [{"path": "lot/<b>s</b>.png", "error": "cannot identify image file"}]
    failed = [{"path": "lot/<b>f</b>.png", "error": "timed out"}]
    page = render("lot", rows, skipped, failed, None, "scored 1 image", tmp_path)
    for name in ("x", "s", "f"):
        assert f"<b>{name}</b>" not in page
        assert f"lot/&lt;b&gt;{name}&lt;/b&gt;.png" in page


def test_the_runs_warnings_are_on_the_page_escaped(tmp_path):
    """What the run warned of (a lot mostly defective, images the other way round, copies) was on the console and in
    results.json only; a person reading the page saw nothing of it."""
    from client.report import render

    rows = [{"path": "a.png", "score": 0.5, "decision": "normal", "rank": 1}]
    warned = ("60 of the lot's 83 images score far above its lowest 23", "identical files: <a.png>, b.png")
    page = render("lot", rows, [], [], None, "scored 1 image", tmp_path, warned)
    assert "<li>warning: 60 of the lot&#x27;s 83 images score far above its lowest 23</li>" in page
    assert "identical files: &lt;a.png&gt;, b.png" in page and "<a.png>" not in page
    assert 'class="warnings"' not in render("lot", rows, [], [], None, "scored 1 image", tmp_path)


def test_the_histogram_axis_ends_near_the_lot_and_counts_what_lies_past_it():
    """A noise image scoring 10x the lot stretched the histogram so that 200 parts filled a bin or two; the axis
    ends a quarter past the larger of the threshold and the 99th percentile, the far scores counted in its last bin."""
    from client.report import histogram_top

    lot = np.random.default_rng(0).uniform(0.04, 0.08, 200)
    assert histogram_top(lot, 0.1) == (lot.max(), 0)  # nothing far: the axis is the scores'
    top, above = histogram_top(np.r_[lot, 0.9], 0.1)
    assert above == 1 and 0.1 < top < 0.12  # the threshold stays on the axis, the far score is counted
    top, above = histogram_top(np.r_[lot, 0.9], None)
    assert above == 1 and top < 0.1
    assert histogram_top(np.array([]), 0.1) == (0.0, 0)
