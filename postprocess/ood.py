"""How unlike a bank's lot an image is as a whole (issue 27): out-of-distribution statistics and their calibration.

A defect is local: a few patches far from the lot. Another product, a camera fault or a lighting change moves the
whole image: most of its map high, or its pixels darker, brighter, flatter than any part of the lot. The statistics
are read from what both sides of the server hold, the anomaly map and the pixels sent, so the client's decision and
the server's drift windows (``postprocess.drift``) compute the same numbers:

- ``map_q25``, ``map_median``, ``map_q75``, ``map_q90``, ``map_mean``: the lower quartile, median, upper quartile,
  90th percentile and mean of the map (a defect covering less than three quarters, half, a quarter or a tenth of the
  image does not move the first four);
- ``brightness``, ``contrast``: the mean and the deviation of the pixel values (two-sided: too dark is as foreign as
  too bright).

A bank keeps ``OodCalibration``: each chosen statistic's lot values (each lot image scored against the others, as
for the decision) and the thresholds an exponential tail (``OOD_METHOD``, nothing left out) puts at ``OOD_BUDGET``
of the lot, split evenly among the statistics (a two-sided one spends half a side), never inside the lot's own range.
An image outside any threshold is *out of distribution*. Which
statistics, chosen on magnetic tile with ``python -m benchmarks.ood``: ``DEFAULT_STATISTICS`` (README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import kernels as K

STATISTICS = ("map_q25", "map_median", "map_q75", "map_q90", "map_mean", "brightness", "contrast")
TWO_SIDED = ("brightness", "contrast")
MAP_QUANTILES = {"map_q25": 0.25, "map_q75": 0.75, "map_q90": 0.90}
DEFAULT_STATISTICS = ("map_q75", "brightness", "contrast")  # chosen on magnetic tile by benchmarks.ood (README)
OOD_BUDGET = 0.005  # the share of the lot's own parts the thresholds leave outside (all statistics together)
OOD_METHOD = "exponential_tail"  # no trimming: a lot value is never called foreign to its own lot
# maps come back from the server as float16: a lot image's statistic read off its served map can lie this much
# (relative) beyond the float32 value the bank was calibrated on, so the lot's own range is widened by it; below
# float16's smallest normal value (6.1e-5) its rounding is absolute, up to half the subnormal step
SERVED_ROUNDING = 2.0 ** -10
SERVED_ROUNDING_ABSOLUTE = 2.0 ** -24
REASONS = {
    "map_q25": "nearly all of the image is unlike the lot",
    "map_median": "most of the image is unlike the lot",
    "map_q75": "much of the image is unlike the lot",
    "map_q90": "a wide part of the image is unlike the lot",
    "map_mean": "the image as a whole is unlike the lot",
    "brightness": "its brightness lies outside the lot's",
    "contrast": "its contrast lies outside the lot's",
}
EXPLANATION = ("this does not look like the parts this bank was built on: wrong product, camera moved, or lighting "
               "changed")


def image_statistics(maps, images, names=STATISTICS) -> dict:
    """name -> (N,) float64 of N maps (N, H, W) and the images sent (N, H, W, 3) uint8 (NumPy or CuPy maps)."""
    xp = K.get_xp(maps)
    flat = maps.reshape(maps.shape[0], -1).astype(xp.float32)
    out = {}
    for name in names:
        if name == "map_median":
            out[name] = K.to_numpy(xp.median(flat, axis=1))
        elif name in MAP_QUANTILES:
            out[name] = K.to_numpy(xp.quantile(flat, MAP_QUANTILES[name], axis=1))
        elif name == "map_mean":
            out[name] = K.to_numpy(flat.mean(axis=1))
        elif name in ("brightness", "contrast"):
            pixels = np.asarray(K.to_numpy(images), dtype=np.float32).reshape(len(images), -1)
            out[name] = pixels.mean(axis=1) if name == "brightness" else pixels.std(axis=1)
        else:
            raise ValueError(f"unknown out-of-distribution statistic {name!r}; one of {', '.join(STATISTICS)}")
        out[name] = np.asarray(out[name], dtype=np.float64)
    return out


@dataclass(frozen=True)
class OodCalibration:
    statistics: tuple[str, ...]
    budget: float
    references: dict  # name -> sorted lot values
    low: dict  # name -> threshold below which an image is outside (-inf for one-sided statistics)
    high: dict  # name -> threshold above which an image is outside

    def outside(self, values: dict) -> tuple[np.ndarray, list]:
        """(N,) bool, and per image the statistics that put it outside (empty when inside)."""
        n = len(next(iter(values.values())))
        hit = np.zeros(n, dtype=bool)
        why: list = [[] for _ in range(n)]
        for name in self.statistics:
            v = np.asarray(values[name], dtype=np.float64)
            out = (v < self.low[name]) | (v > self.high[name])
            hit |= out
            for i in np.flatnonzero(out):
                why[i].append(name)
        return hit, why

    def to_dict(self) -> dict:
        bound = lambda v: None if not math.isfinite(v) else float(v)  # noqa: E731 - JSON has no infinity
        return {"statistics": list(self.statistics), "budget": self.budget, "method": OOD_METHOD,
                "references": {k: [float(x) for x in v] for k, v in self.references.items()},
                "low": {k: bound(v) for k, v in self.low.items()}, "high": {k: bound(v) for k, v in self.high.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "OodCalibration":
        names = tuple(str(n) for n in d["statistics"])
        if not names or any(n not in STATISTICS for n in names):
            raise ValueError(f"out-of-distribution statistics {list(names)}: each one of {', '.join(STATISTICS)}")
        unbound = lambda v, inf: inf if v is None else float(v)  # noqa: E731
        low = {n: unbound(d["low"].get(n), -math.inf) for n in names}
        high = {n: unbound(d["high"].get(n), math.inf) for n in names}
        if any(math.isnan(v) for v in [*low.values(), *high.values()]):
            raise ValueError("an out-of-distribution threshold is NaN")
        budget = float(d["budget"])
        if not 0.0 < budget < 0.5:
            raise ValueError(f"an out-of-distribution budget is a fraction between 0 and 0.5, got {budget}")
        return cls(names, budget, {n: tuple(float(x) for x in d["references"][n]) for n in names}, low, high)


def calibrate_ood(values: dict, names=DEFAULT_STATISTICS, budget: float = OOD_BUDGET) -> OodCalibration:
    """Thresholds from the lot's own values of each statistic: the decision's tail method at ``budget`` shared among
    the statistics (half a side for a two-sided one)."""
    from .decision import calibrate

    share = budget / len(names)
    low, high, refs = {}, {}, {}
    for name in names:
        v = np.asarray(values[name], dtype=np.float64)
        refs[name] = tuple(float(x) for x in np.sort(v))
        # never inside the lot's own range (as the client reads it off served maps): what the lot holds is not
        # foreign to it
        top, bottom = (float(x) + sign * (abs(float(x)) * SERVED_ROUNDING + SERVED_ROUNDING_ABSOLUTE)
                       for x, sign in ((v.max(), 1), (v.min(), -1)))
        if name in TWO_SIDED:
            high[name] = max(top, calibrate(v, None, share / 2, OOD_METHOD).threshold)
            low[name] = min(bottom, -calibrate(-v, None, share / 2, OOD_METHOD).threshold)
        else:
            high[name] = max(top, calibrate(v, None, share, OOD_METHOD).threshold)
            low[name] = -math.inf
    return OodCalibration(tuple(names), budget, refs, low, high)


def reason(names: list) -> str:
    """What a caption or a results row says of an image outside: the statistics' reasons, then what it means."""
    return "; ".join(REASONS[n] for n in names) + f": {EXPLANATION}"


def named_in(text: str) -> str:
    """The statistics' reasons of a ``reason`` text, without what it means (where space is short)."""
    return text.removesuffix(f": {EXPLANATION}")
