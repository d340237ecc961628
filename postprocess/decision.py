"""OK/NG without labels: a threshold and a calibrated score derived from a lot's own scores.

A lot is mostly good parts, and the scores of good parts form the lower, dense part of the lot's distribution:
defective parts only add a tail above it. Each method estimates the centre and spread of the good parts' scores
from the lot without knowing which images are defective, and puts the threshold where a false-alarm budget
(``false_alarm_rate``, the fraction of good parts called defective) says, assuming the good scores' upper tail is
Gaussian: ``threshold = centre + z * spread``, ``z`` the standard normal quantile of ``1 - false_alarm_rate``.

The calibrated score is ``1 / (1 + exp(-(score - threshold) / spread))``: 0-1, **0.5 at the threshold**, 0.73 one
spread above it. A bank keeps the centre and spread (its ``decision`` in the manifest), so an image scored alone
later gets the same threshold, calibrated score and decision; the budget can be changed when scoring.

Methods (``benchmarks/decisions.py`` measures them at real defect rates; README "Decisions"):
- ``lower_half``: centre = median; spread = root mean square of (score - median) over the scores below the median,
  the side defects do not reach (robust while fewer than half the parts are defective);
- ``mad``: centre = median; spread = 1.4826 * median absolute deviation (both sides);
- ``upper_quartile``: centre = median; spread = (75th percentile - median) / 0.6745, the Gaussian sigma of the
  upper side only (good parts' scores lean right);
- ``exponential_tail``: the good parts' upper tail as exponential (a peaks-over-threshold model): above the 75th
  percentile q75, P(score > t) = 0.25 exp(-(t - q75) / beta), beta = median excess over q75 / ln 2 (the median, so a
  few defects in the tail do not stretch it); threshold = q75 + beta ln(0.25 / false_alarm_rate), spread = beta;
- ``quartile_exponential``: the same exponential model from the median up, its scale from the quartiles alone:
  P(score > t) = 0.5 exp(-(t - median) / beta), beta = (75th percentile - median) / ln 2; threshold = median +
  beta ln(0.5 / false_alarm_rate). It holds while fewer than a quarter of the lot are defective (the tail model above
  the 75th percentile breaks once an eighth are);
- ``normal_images``: centre and spread = mean and standard deviation of the images the method chose as normal.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm

METHODS = ("lower_half", "mad", "upper_quartile", "exponential_tail", "quartile_exponential", "normal_images")
EXPONENTIAL_FROM = {"exponential_tail": 0.75, "quartile_exponential": 0.5}  # where each tail model starts
# the largest fraction of defective parts in a lot each method tolerates before its estimate is theirs, not the good
# parts' (by construction: which order statistics it reads)
BREAKDOWN = {"lower_half": 0.5, "mad": 0.5, "upper_quartile": 0.25, "quartile_exponential": 0.25,
             "exponential_tail": 0.125, "normal_images": 0.0}
DEFAULT_METHOD = "quartile_exponential"  # chosen on magnetic tile by benchmarks.decisions; README "Decisions"
DEFAULT_FALSE_ALARM_RATE = 0.01
MIN_SPREAD_FRACTION = 1e-3  # of |centre|: a lot of identical scores still gets a usable scale


class DecisionError(ValueError):
    """A threshold or budget that cannot be used; the message gives the range."""


@dataclass(frozen=True)
class Calibration:
    method: str
    centre: float
    spread: float
    false_alarm_rate: float
    n_images: int

    @property
    def threshold(self) -> float:
        return threshold_for(self.centre, self.spread, self.false_alarm_rate, self.method)

    def with_rate(self, false_alarm_rate: float | None) -> "Calibration":
        if false_alarm_rate is None:
            return self
        return Calibration(self.method, self.centre, self.spread, check_false_alarm_rate(false_alarm_rate),
                           self.n_images)

    def calibrated(self, scores) -> np.ndarray:
        """Raw scores -> 0-1, 0.5 at the threshold (NaN stays NaN)."""
        z = (np.asarray(scores, dtype=np.float64) - self.threshold) / self.spread
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))

    def raw(self, calibrated: float) -> float:
        """The raw score whose calibrated score is ``calibrated`` (strictly between 0 and 1): ``calibrated``'s
        inverse, e.g. a user's calibrated threshold in map units."""
        return float(self.threshold + self.spread * np.log(calibrated / (1.0 - calibrated)))

    def to_dict(self) -> dict:
        return {**asdict(self), "threshold": self.threshold}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(str(d["method"]), float(d["centre"]), float(d["spread"]), float(d["false_alarm_rate"]),
                   int(d["n_images"]))


def check_false_alarm_rate(rate) -> float:
    rate = float(rate)
    if not (math.isfinite(rate) and 0.0 < rate < 0.5):
        raise DecisionError(f"the false-alarm rate must be a fraction between 0 and 0.5 (e.g. 0.01 for 1% of good "
                            f"parts called defective), got {rate}")
    return rate


def check_calibrated_threshold(value) -> float:
    """A user's threshold on the calibrated scale: strictly between 0 and 1 (0.5 = the automatic threshold)."""
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise DecisionError(f"a threshold is a calibrated score strictly between 0 and 1 (0.5 is the bank's "
                            f"automatic threshold; higher calls fewer parts defective), got {value}")
    return value


def threshold_for(centre: float, spread: float, false_alarm_rate: float, method: str = DEFAULT_METHOD) -> float:
    """Gaussian methods: centre + z * spread; exponential ones: centre (where the tail starts) + spread *
    ln(tail fraction / rate)."""
    if method in EXPONENTIAL_FROM:
        tail = 1.0 - EXPONENTIAL_FROM[method]
        return float(centre + spread * math.log(tail / min(false_alarm_rate, tail)))
    return float(centre + norm.ppf(1.0 - false_alarm_rate) * spread)


def calibrate(scores, normal_indices=None, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
              method: str = DEFAULT_METHOD) -> Calibration:
    """The calibration of a lot from its scores (and, for ``normal_images``, the indices of the images chosen as
    normal)."""
    if method not in METHODS:
        raise DecisionError(f"unknown decision method {method!r}; one of {', '.join(METHODS)}")
    false_alarm_rate = check_false_alarm_rate(false_alarm_rate)
    raw = np.asarray(scores, dtype=np.float64).reshape(-1)
    scores = raw[np.isfinite(raw)]
    if scores.size < 2:
        raise DecisionError(f"a calibration needs the scores of at least 2 images, got {scores.size}")
    centre = float(np.median(scores))
    if method == "lower_half":
        below = scores[scores < centre] - centre
        spread = float(np.sqrt(np.mean(below ** 2))) if below.size else 0.0
    elif method == "mad":
        spread = 1.4826 * float(np.median(np.abs(scores - centre)))
    elif method == "upper_quartile":
        spread = (float(np.quantile(scores, 0.75)) - centre) / norm.ppf(0.75)
    elif method == "quartile_exponential":
        spread = (float(np.quantile(scores, 0.75)) - centre) / math.log(2.0)
    elif method == "exponential_tail":
        centre = float(np.quantile(scores, EXPONENTIAL_FROM[method]))
        excess = scores[scores > centre] - centre
        spread = float(np.median(excess)) / math.log(2.0) if excess.size else 0.0
    else:
        chosen = scores if normal_indices is None else raw[np.asarray(normal_indices, dtype=np.int64)]
        chosen = chosen[np.isfinite(chosen)]
        if chosen.size < 2:
            chosen = scores
        centre, spread = float(np.mean(chosen)), float(np.std(chosen, ddof=1))
    spread = max(spread, MIN_SPREAD_FRACTION * max(abs(centre), 1e-6))
    return Calibration(method, centre, spread, false_alarm_rate, int(scores.size))


def decide(calibrated_scores, threshold: float = 0.5) -> list[str]:
    """'anomalous' above the threshold (calibrated scale), 'normal' at or below it, 'invalid' for NaN."""
    out = []
    for c in np.asarray(calibrated_scores, dtype=np.float64).reshape(-1):
        out.append("invalid" if not np.isfinite(c) else "anomalous" if c > threshold else "normal")
    return out


__all__ = ["Calibration", "DecisionError", "METHODS", "DEFAULT_METHOD", "DEFAULT_FALSE_ALARM_RATE", "calibrate",
           "check_calibrated_threshold", "check_false_alarm_rate", "decide", "threshold_for"]
