"""OUT/report.html: one self-contained page for a scored lot, read in any browser without the rest of OUT.

- the lot's score histogram with the threshold (matplotlib, embedded as a PNG);
- the images worst first as thumbnails (embedded), each with its rank, score, calibrated score and decision (marked
  provisional when the bank's threshold is extrapolated from too few lot images; an image out of distribution with
  why), and a
  link to its full overlay (OUT/overlays/..., relative: the page works where OUT is copied);
- the images skipped or failed, with the reason.
"""

from __future__ import annotations

import base64
import html
import io
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image

from postprocess.atomic import write_atomic
from postprocess.decision import OVER_THRESHOLD_NOTE

THUMBNAIL_SIDE = 220
DECISION_CLASSES = {"anomalous": "bad", "normal": "good", "out_of_distribution": "foreign"}
STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: 0.2em; }
.summary { margin: 0.3em 0 1em; }
.warnings { color: #8a4b00; margin: 0 0 1em; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.card { width: 230px; border: 1px solid #ccc; border-radius: 4px; padding: 5px; font-size: 0.85em; }
.card img { width: 100%; display: block; }
.card .name { overflow-wrap: anywhere; }
.bad { color: #c81e1e; font-weight: bold; }
.good { color: #1e8c3c; }
.unknown { color: #666; }
.foreign { color: #b46e00; font-weight: bold; }
.provisional { color: #a06000; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
"""
# Counts the pictures that really loaded and any error, for a reader (or a test in a browser) to check.
CHECK_SCRIPT = """
window.addEventListener('error', function (e) { document.body.dataset.errors = (+document.body.dataset.errors || 0) + 1; }, true);
window.addEventListener('load', function () {
  var shown = Array.prototype.filter.call(document.querySelectorAll('img.thumb'),
    function (img) { return img.complete && img.naturalWidth > 0; }).length;
  document.body.dataset.thumbnailsShown = shown;
});
"""


def _data_uri(picture: Image.Image, kind: str = "JPEG") -> str:
    buffer = io.BytesIO()
    picture.save(buffer, kind, quality=85) if kind == "JPEG" else picture.save(buffer, kind)
    mime = "image/jpeg" if kind == "JPEG" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def histogram_top(scores: np.ndarray, threshold: float | None) -> tuple[float, int]:
    """Where the histogram's axis ends, and how many scores lie past it (drawn in its last bin): a quarter past the
    larger of the threshold and the scores' 99th percentile. One image scoring 10x the rest (a black frame, noise)
    stretched the axis so far that the lot filled a bin or two."""
    if not len(scores):
        return 0.0, 0
    low, bulk = float(np.min(scores)), float(np.quantile(scores, 0.99))
    if threshold is not None and np.isfinite(threshold):
        bulk = max(bulk, float(threshold))
    top = bulk + 0.25 * (bulk - low)
    above = int(np.sum(scores > top))
    return (top, above) if above else (float(np.max(scores)), 0)


def histogram(scores: list[float], threshold: float | None) -> str:
    """The score histogram with the threshold, as a PNG data URI."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 2.6), dpi=100)
    axes = figure.add_subplot()
    finite = np.asarray([s for s in scores if np.isfinite(s)])
    top, above = histogram_top(finite, threshold)
    axes.hist(np.minimum(finite, top), bins=max(10, min(60, len(finite) // 3 or 1)), color="#4a7fb5")
    if above:
        axes.annotate(f"{above} above {top:.4g}, drawn at it", (top, 0), xytext=(-4, 40), textcoords="offset points",
                      ha="right", fontsize=8, arrowprops={"arrowstyle": "->"})
    if threshold is not None:
        axes.axvline(threshold, color="#c81e1e", linestyle="--", label=f"threshold {threshold:.4g}")
        axes.legend(loc="upper right")
    axes.set_xlabel("image score (raw)")
    axes.set_ylabel("images")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"


def _thumbnail(row: dict, out: Path) -> str | None:
    overlay = row.get("overlay")  # relative to the run's folder
    if not overlay or not (out / overlay).is_file():
        return None
    with Image.open(out / overlay) as picture:
        picture = picture.convert("RGB")
        picture.thumbnail((THUMBNAIL_SIDE * 2, THUMBNAIL_SIDE))
        return _data_uri(picture)


def render(title: str, rows: list, skipped: list, failed: list, threshold: float | None, summary: str,
           out: Path, warnings: tuple = ()) -> str:
    """The page; ``warnings``: what the run warned of (lot checks, a lot mostly defective), shown under the summary
    (they were on the console and in results.json only, where a person reading the page did not see them)."""
    e = html.escape
    cards = []
    for row in rows:
        decision = row.get("decision", "unknown")
        calibrated = "" if row.get("calibrated") is None else f", calibrated {row['calibrated']:.3f}"
        thumb = _thumbnail(row, out)
        link = row.get("overlay")
        picture = f'<img class="thumb" src="{thumb}" alt="{e(Path(row["path"]).name)}">' if thumb else ""
        if link and picture:
            # a relative URL: '#', '?' and '%' in a file name are characters of the name, not of the URL
            picture = f'<a href="{e(urllib.parse.quote(Path(link).as_posix()))}">{picture}</a>'
        cards.append(f'<div class="card">{picture}<div>#{row.get("rank", "")} '
                     f'<span class="{DECISION_CLASSES.get(decision, "unknown")}">{e(decision)}</span>'
                     + (' <span class="provisional">(provisional)</span>' if row.get("provisional") else "")
                     + f' score {row["score"]:.4f}{calibrated}</div>'
                     + (f'<div class="foreign">{e(row["ood_reason"])}'
                        + (f"; {OVER_THRESHOLD_NOTE}" if row.get("over_threshold") else "") + "</div>"
                        if row.get("ood_reason") else "")
                     + f'<div class="name">{e(row["path"])}</div></div>')
    left_out = "".join(f"<tr><td>{kind}</td><td>{e(item['path'])}</td><td>{e(item.get('error', ''))}</td></tr>"
                       for kind, items in (("skipped", skipped), ("failed", failed)) for item in items)
    scores = [row["score"] for row in rows]
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            f"<style>{STYLE}</style><script>{CHECK_SCRIPT}</script></head><body>"
            f"<h1>{e(title)}</h1><p class=\"summary\">{e(summary)}</p>"
            + (f'<ul class="warnings">{"".join(f"<li>warning: {e(w)}</li>" for w in warnings)}</ul>'
               if warnings else "")
            + (f'<img class="histogram" src="{histogram(scores, threshold)}" alt="score histogram">' if scores else "")
            + f"<h2>Images, worst first ({len(rows)})</h2><div class=\"grid\">{''.join(cards)}</div>"
            + (f"<h2>Not scored ({len(skipped) + len(failed)})</h2><table><tr><th></th><th>image</th><th>why</th>"
               f"</tr>{left_out}</table>" if left_out else "")
            + "</body></html>\n")


def write_report(out: Path, title: str, rows: list, skipped: list, failed: list, threshold: float | None,
                 summary: str, warnings: tuple = ()) -> Path:
    page = render(title, rows, skipped, failed, threshold, summary, Path(out), warnings)
    return write_atomic(Path(out) / "report.html", page)
