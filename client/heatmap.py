"""Heat-map pictures a person reads without the README: the image, the map laid over it with the outline of the
region that makes the decision, a caption (file name, score, decision) and a colour bar with the map's scale.

One story per image: the outline is drawn only on an image decided anomalous, where its map reaches the level that
belongs to the decision (``postprocess.decision.map_level``: with lot-level re-scoring an image's score is not its
map's maximum, so the bank's threshold alone would outline pits on parts decided normal); the colour bar always
marks that level, written "above the scale" when the map's colours stop below it.

Colours come from matplotlib's colour maps (looked up once as a table); drawing, text and the outline from Pillow.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from postprocess.ood import named_in

COLOUR_MAP = "turbo"  # perceptually ordered, blue (like the lot) to red (anomalous)
DEFAULT_OVERLAY_SIZE = 768  # the longest side of each panel in pixels (client/infer.py --overlay-size)
DECISION_COLOURS = {"anomalous": (200, 30, 30), "normal": (30, 140, 60), "out_of_distribution": (190, 110, 0)}
OUTLINE_COLOUR = (255, 255, 255)
BAR_WIDTH, MARGIN, GAP = 18, 8, 4


@lru_cache(maxsize=4)
def colour_table(name: str = COLOUR_MAP) -> np.ndarray:
    """(256, 3) uint8: matplotlib's colour map ``name`` sampled once."""
    from matplotlib import colormaps

    return (colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def colorize(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """(H, W) floats -> (H, W, 3) uint8, ``low`` at the cold end of the colour map, ``high`` at the hot end."""
    span = max(high - low, 1e-12)
    t = np.clip((np.asarray(values, dtype=np.float32) - low) / span, 0.0, 1.0)
    # a pixel with no value (NaN) at the cold end: a picture of the rest rather than no picture at all
    t = np.nan_to_num(t, nan=0.0)
    return colour_table()[np.round(t * 255).astype(np.int64)]


def _resized_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.shape != (height, width):
        amap = np.asarray(Image.fromarray(amap, mode="F").resize((width, height), Image.BILINEAR))
    return amap


def overlay(image: np.ndarray, anomaly_map: np.ndarray, low: float, high: float, opacity: float = 0.5) -> np.ndarray:
    """The map coloured and blended over the (H, W, 3) uint8 image (map resized to the image if needed)."""
    h, w = image.shape[:2]
    colour = colorize(_resized_map(anomaly_map, h, w), low, high).astype(np.float32)
    return (image.astype(np.float32) * (1 - opacity) + colour * opacity).astype(np.uint8)


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The boundary pixels of a boolean region (the region less its erosion), ``width`` pixels wide; the picture's
    edge counts as outside, so a region that fills the picture is still outlined."""
    padded = np.pad(np.asarray(mask, dtype=np.uint8) * 255, 1)
    eroded = np.asarray(Image.fromarray(padded).filter(ImageFilter.MinFilter(3)))[1:-1, 1:-1]
    edge = padded[1:-1, 1:-1] > eroded
    if width > 1:
        edge = np.asarray(Image.fromarray(edge.astype(np.uint8) * 255).filter(
            ImageFilter.MaxFilter(2 * (width // 2) + 1))) > 0
    return edge


def fit(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """The image scaled down so that its longest side is at most ``max_side`` (never up)."""
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS))


def region_mask(anomaly_map: np.ndarray, level: float, height: int, width: int) -> np.ndarray:
    """Where the map reaches ``level``, found at the map's own resolution and then scaled to (height, width) so that
    no pixel of it is lost (resizing the map first would smooth a one-pixel peak below the level)."""
    region = np.asarray(anomaly_map, dtype=np.float32) >= level
    if region.shape == (height, width):
        return region
    return np.asarray(Image.fromarray(region.astype(np.uint8) * 255).resize((width, height), Image.BOX)) > 0


@dataclass(frozen=True)
class Caption:
    """What the picture says about its image. ``threshold``: the map value that belongs to its decision (the colour
    bar marks it; the region reaching it is outlined when the decision is anomalous; None: neither).
    ``provisional``: the bank's threshold is extrapolated from too few lot images (``Calibration.confidence``)."""
    name: str
    score: float
    calibrated: float | None = None
    decision: str = "unknown"
    threshold: float | None = None
    provisional: bool = False
    cut: float | None = None  # the calibrated score the decision turns at: the user's --threshold; None: 0.5, the bank's
    reason: str | None = None  # out of distribution: what put it there (``ood.reason``)
    over_threshold: bool = False  # out of distribution with a score above the threshold

    @property
    def outlined(self) -> bool:
        return self.threshold is not None and self.decision == "anomalous"

    def text(self) -> str:
        where = "0.5 = threshold" if self.cut is None else f"{self.cut:g} = threshold (--threshold)"
        calibrated = "" if self.calibrated is None else f" (calibrated {self.calibrated:.2f}; {where})"
        provisional = " (provisional)" if self.provisional else ""
        if self.decision == "out_of_distribution":  # the score is not a verdict on this image: said first
            why = named_in(self.reason) if self.reason else "unlike the bank's lot"
            over = ", above the threshold (a large defect?)" if self.over_threshold else ""
            return f"OUT OF DISTRIBUTION: {why}{provisional}  score {self.score:.4f}{over}"
        return f"{self.decision.upper()}{provisional}  score {self.score:.4f}{calibrated}"


@lru_cache(maxsize=4)
def _font(size: int):
    return ImageFont.load_default(size=size)


def _colour_bar(height: int, low: float, high: float, threshold: float | None, font) -> Image.Image:
    """A vertical bar, hot end at the top, with the map values of its ends and the threshold written beside; a
    threshold beyond the scale is marked at the end it lies past."""
    ramp = colorize(np.linspace(high, low, height)[:, None].repeat(BAR_WIDTH, axis=1), low, high)
    labels = bar_labels(height, low, high, threshold, font.size)
    text_width = max(int(font.getlength(text)) for _, _, text in labels) + 6
    bar = Image.new("RGB", (BAR_WIDTH + text_width, height), "white")
    bar.paste(Image.fromarray(ramp), (0, 0))
    draw = ImageDraw.Draw(bar)
    for y, top, text in labels:
        draw.line([(0, y), (BAR_WIDTH + 3, y)], fill="black")
        if text:
            draw.text((BAR_WIDTH + 5, top), text, fill="black", font=font)
    return bar


def bar_labels(height: int, low: float, high: float, threshold: float | None, size: int) -> list:
    """The colour bar's ticks as (row, top of its text, text): the ends' values and the threshold. An end's value
    whose text the threshold's would overlap keeps its tick without its text (a threshold near the bottom of the
    scale printed "0.00045threshold" over it)."""
    def top(y: int) -> int:
        return min(max(0, y - size // 2), height - size - 2)

    ends = [(0, f"{high:.3g}"), (height - 1, f"{low:.3g}")]
    if threshold is None or not np.isfinite(threshold):
        return [(y, top(y), text) for y, text in ends]
    text = f"{threshold:.3g} threshold for this image"
    # an image's level is its own (decision.map_level: the map's float16 maximum against its float32 score): one a
    # rounding past the run's threshold, at the scale's top, read "above the scale" on some images and not others
    slack = 1e-3 * (high - low)
    if threshold > high + slack:  # the map's colours stop below it: its text just under the top label's
        y, text = min(size + 2 + size // 2, height - 1), text + " (above the scale)"
    elif threshold < low - slack:  # its text just over the bottom label's
        y, text = max(0, height - 2 * size - 4 + size // 2), text + " (below the scale)"
    else:  # on the scale, its ends included (a run's scale ends at its threshold: infer.colour_range)
        y = min(max(round((high - threshold) / (high - low) * (height - 1)), 0), height - 1) if high > low else 0
    kept = [(e, top(e), t if abs(top(e) - top(y)) > size + 1 else "") for e, t in ends]
    return kept + [(y, top(y), text)]


def render_panel(image: np.ndarray, anomaly_map: np.ndarray, low: float, high: float,
                 caption: Caption | None = None, mask: np.ndarray | None = None,
                 max_side: int | None = DEFAULT_OVERLAY_SIZE) -> Image.Image:
    """[image | heat map with outline | ground truth (if given) | colour bar] under a caption, as one picture."""
    shown = fit(image, max_side)
    h, w = shown.shape[:2]
    amap = _resized_map(anomaly_map, h, w)
    heat = overlay(shown, amap, low, high)
    threshold = None if caption is None else caption.threshold
    if caption is not None and caption.outlined:
        region = region_mask(anomaly_map, threshold, h, w)
        heat[outline(region, width=max(1, round(max(h, w) / 256)))] = OUTLINE_COLOUR
    panels = [shown, heat]
    if mask is not None:
        truth = np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize((w, h), Image.NEAREST))
        panels.append(np.repeat(truth[..., None], 3, axis=-1))
    font = _font(max(11, min(18, h // 14)))
    bar = _colour_bar(h, low, high, threshold, font)
    header = 0 if caption is None else 2 * (font.size + 6) + MARGIN
    width = sum(p.shape[1] for p in panels) + GAP * len(panels) + bar.width + MARGIN
    picture = Image.new("RGB", (width, header + h + MARGIN), "white")
    x = 0
    for panel in panels:
        picture.paste(Image.fromarray(panel), (x, header))
        x += panel.shape[1] + GAP
    picture.paste(bar, (x, header))
    if caption is not None:
        draw = ImageDraw.Draw(picture)
        draw.text((MARGIN // 2, 3), one_line(caption.name), fill="black", font=font)
        draw.text((MARGIN // 2, font.size + 9), caption.text(), font=font,
                  fill=DECISION_COLOURS.get(caption.decision, (90, 90, 90)))
    return picture


def one_line(name: str) -> str:
    """A file name on one line: its control characters as escapes (a newline in a name drew its second line over
    the caption's decision, and broke the console's list of the worst images)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)


def save_panel(path: str | Path, image: np.ndarray, anomaly_map: np.ndarray, low: float, high: float,
               mask: np.ndarray | None = None, caption: Caption | None = None,
               max_side: int | None = DEFAULT_OVERLAY_SIZE) -> Path:
    """``render_panel`` written as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_panel(image, anomaly_map, low, high, caption, mask, max_side).save(path)
    return path
