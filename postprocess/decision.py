"""OK/NG without labels: a threshold and a calibrated score derived from a lot's own scores.

**What the budget means.** ``false_alarm_rate`` is the expected fraction of *new* good parts, scored later against
the bank, that the threshold calls anomalous. The lot's own scores are what tells us where that is: each lot image
is scored against the other lot images (never against its own patches), so a good lot image's score is drawn like a
new good part's (``python -m benchmarks.line`` measures both, through a server).

**The default method, ``quartile_exponential``** (chosen on magnetic tile with ``python -m benchmarks.line``, on lots
0, 2, 5 and 10% defective, together with the lot stage's interval fraction of 5% and the map's maximum, not
re-scored, as the image score; reported on ball screw; README "Decisions on a line"): the good parts' upper tail is
taken as exponential above the lot's median, its scale from the quartiles: P(score > t) = 0.5 exp(-(t - median) /
b), b = (q75 - median) / ln 2; threshold = median + b ln(0.5 / budget), ``spread`` = b. Read off the median and the
upper quartile, it tolerates a quarter of the lot defective before its estimate is theirs. The rule that chose it
asks that a method tolerate a demo-like lot (a sixth defective, ``benchmarks.line.MIN_BREAKDOWN``) whatever its
trims do, which rules out ``trimmed_tail`` (below), closer to the budget on magnetic tile.

``quartile_conformal`` (measured beside it, not the default): the quartile model never above the lot's own score at
rank (n + 1)(1 - budget), interpolated (``conformal_cap``), where the lot reaches that rank (budget >= 1 / (n + 1):
5% from 19 images, 1% from 99). A new good part exceeds that order statistic with the budget's probability when the
lot is clean and exchangeable with the new parts, and a lot's defects can only lift it, so the smaller of the two
tolerates what the quartile model tolerates; where the good parts' tail is lighter than exponential (ball screw's
lots with defects in them) it spends the budget the quartile model leaves unspent, but where the new parts already
score above the lot's (magnetic tile's clean lots) it adds false alarms, and the rule keeps the quartile model.

``trimmed_tail`` (the default before the quartile model; now beside it): suspected defects are left out first
(where the gap between two of the top scores exceeds ``TRIM_GAP`` tail scales of the scores below it, everything
above the gap, at most ``MAX_TRIM`` of the lot), then an exponential tail above the remaining scores' 75th
percentile q75, its scale the median excess over q75 / ln 2: threshold = q75 + b ln(0.25 / budget). When the trim
misses (defects close together, as the demo lot's four washers: a gap of 5.9 tail scales), it is
``exponential_tail``, stretched by every defect in the top quarter.

Measured beside it (``METHODS``): ``lot_quantile``, the conformal reading (the threshold is the reference's order
statistic at rank (n + 1)(1 - budget), distribution-free for a clean lot, an exponential tail past the largest
score): exact on clean synthetic lots but conservative on real ones, where a lot's few defects sit among its top
scores and lift the ranks a 36-image lot reads at 1-5%; ``exponential_tail`` (the same tail without leaving
anything out: breaks once an eighth of the lot is defective far above the rest); and the older parametric
methods, kept so that banks built with them keep their decisions (``threshold = centre + z * spread`` for the
Gaussian ones, z the normal quantile of 1 - budget): ``lower_half`` (median; RMS of the scores below it), ``mad``,
``upper_quartile`` ((q75 - median) / 0.6745), ``normal_images`` (mean and deviation of the images chosen as
normal). Every calibration keeps the lot's scores it read (``reference``), so that a bank grown with new parts
(``postprocess.growth``) reads its threshold again from them and the new ones.

**How sure it is.** ``Calibration.confidence`` states the 5-95% range of false-alarm rates that lots of this size
realise on new good parts, and the median lot's: for ``lot_quantile`` the order statistic's Beta((n + 1) budget,
(n + 1)(1 - budget)) law over clean lots; for the other methods what lots drawn from the method's own model of the
scores realise (``model_realised_rates``: the default at 36 images and 1%: 0.1% to 6.8%, half above 1.3%; its mean
is 2.2%, a noisy scale erring both ways on a convex rate). A threshold is *provisional* when it is read off fewer
than ``images_needed`` images (36 at 1%: where the budget's rank lies more than one tail scale past the lot's largest
score under an exponential tail; a rule on the lot's size, whatever the method) or when the lot's scores tie where it
reads them (``Calibration.tied``); the results say so and what would measure it.

The calibrated score is ``1 / (1 + exp(-(score - threshold) / spread))``: 0-1, **0.5 at the threshold**. A bank keeps
the calibration (its ``decision`` in the manifest), so an image scored alone later gets the same threshold,
calibrated score and decision; the budget can be changed when scoring.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta as beta_distribution, norm

from .errors import RequestError
from .kernels import image_scores  # the scoring's own reduction of a map to a number (Decider.decide)

METHODS = ("lot_quantile", "trimmed_tail", "lower_half", "mad", "upper_quartile", "exponential_tail",
           "quartile_exponential", "normal_images", "quartile_conformal")
# where each tail model starts
EXPONENTIAL_FROM = {"exponential_tail": 0.75, "trimmed_tail": 0.75, "quartile_exponential": 0.5}
# the largest fraction of defective parts in a lot each method tolerates before its estimate is theirs, not the good
# parts' (by construction: which order statistics it reads, the trims counting for nothing, since a trim misses
# defects that sit close together: then trimmed_tail is exponential_tail, and lot_quantile's order statistic moves
# with each defect)
BREAKDOWN = {"lower_half": 0.5, "mad": 0.5, "upper_quartile": 0.25, "quartile_exponential": 0.25,
             "quartile_conformal": 0.25,
             "exponential_tail": 0.125, "normal_images": 0.0, "lot_quantile": 0.0, "trimmed_tail": 0.125}
DEFAULT_METHOD = "quartile_exponential"  # chosen on magnetic tile by benchmarks.line; README "Decisions on a line"
DEFAULT_FALSE_ALARM_RATE = 0.01
MIN_SPREAD_FRACTION = 1e-3  # of |centre|: a lot of identical scores still gets a usable scale
# one good part in a million: far below what any lot measures, and above where the tail's log overflowed (1e-309 made
# every threshold infinite, and the confidence statement crashed)
MIN_FALSE_ALARM_RATE = 1e-6
TAIL_FRACTION = 0.25  # lot_quantile: the top quarter of the reference sets the tail scale (at least TAIL_MIN)
TAIL_MIN = 3
TRIM_GAP = 6.0  # lot_quantile: a gap of this many tail scales above the next score marks a suspected defect
MAX_TRIM = 0.2  # of the lot: never more left out than this (a line's lot is a few percent defective)
CONFIDENCE = 0.9  # the share of lots the stated range of realised false-alarm rates covers
MODEL_LOTS = 4000  # lots drawn to read a tail model's range of realised rates (seeded: the same statement each time)
MODEL_DRAWS = 4_000_000  # scores drawn at most for one range (fewer lots, at least MODEL_LOTS_MIN, for huge lots)
MODEL_LOTS_MIN = 400
READS_REFERENCE = ("lot_quantile", "trimmed_tail", "quartile_conformal")  # thresholds that read the lot's scores


class DecisionError(RequestError):
    """A threshold or budget that cannot be used, or scores no threshold can be read from; the message says why (the
    caller's to fix: a 400 where a server meets it, as a lot whose scores are not numbers)."""


def spread_floor(centre: float) -> float:
    """The smallest scale a spread or a tail is read with: ``MIN_SPREAD_FRACTION`` of the scores' centre."""
    return MIN_SPREAD_FRACTION * max(abs(centre), 1e-6)


def tail_scale(sorted_scores: np.ndarray) -> float:
    """Exponential scale of the upper tail from the gaps between the top quarter's scores (at least TAIL_MIN).

    Under an exponential tail of scale b, the j-th gap from the top times j is exponential with scale b whatever j
    (Renyi): their median / ln 2 estimates b, and one wide gap (a cluster of look-alike parts above the rest, a
    defect) does not stretch it as a mean excess would.
    """
    n = len(sorted_scores)
    m = min(n - 1, max(TAIL_MIN, int(math.ceil(TAIL_FRACTION * n))))
    if m < 1:
        return 0.0
    top = sorted_scores[::-1][:m + 1]
    gaps = (top[:-1] - top[1:]) * np.arange(1, m + 1)
    return float(np.median(gaps)) / math.log(2.0)


def trim_suspected_defects(sorted_scores: np.ndarray) -> int:
    """How many of the top scores to leave out as suspected defects: the deepest place, among the top MAX_TRIM of the
    lot, where the gap to the next score exceeds TRIM_GAP tail scales of what lies below it (for the largest score
    of an exponential tail that gap is exponential too: e^-TRIM_GAP of clean lots trim it; deeper gaps are smaller)."""
    n = len(sorted_scores)
    cut = 0
    for depth in range(1, int(MAX_TRIM * n) + 1):
        top = n - depth  # the index of the depth-th largest
        below = sorted_scores[:top]
        if len(below) < TAIL_MIN + 2:
            break
        # floored as a calibration's spread is: a defect above tied good scores is infinitely many scales away,
        # where a zero scale trimmed nothing (and one 1e-9 apart trimmed it)
        scale = max(tail_scale(below), spread_floor(float(np.median(below))))
        if sorted_scores[top] - sorted_scores[top - 1] > TRIM_GAP * scale:
            cut = depth
    return cut


def quantile_threshold(reference, spread: float, false_alarm_rate: float) -> float:
    """The reference's order statistic at rank (n + 1)(1 - rate), interpolated; beyond the largest, the exponential
    tail of scale ``spread``."""
    x = np.asarray(reference, dtype=np.float64)
    n = len(x)
    rank = (n + 1) * (1.0 - false_alarm_rate)  # 1-based
    if rank <= 1:
        return float(x[0])
    if rank <= n:
        k = int(math.floor(rank))
        return float(x[k - 1] + (rank - k) * (x[min(k, n - 1)] - x[k - 1]))
    return float(x[-1] + spread * math.log(1.0 / ((n + 1) * false_alarm_rate)))


def conformal_cap(reference, false_alarm_rate: float) -> float:
    """The lot's own order statistic at rank (n + 1)(1 - rate), interpolated, where the lot reaches it (rate at
    least 1 / (n + 1)); inf where it does not (a 36-image lot at 1%). A new good part exceeds it with probability
    ``rate`` if the lot is clean; each defect in the lot can only lift it."""
    n = len(reference)
    if (n + 1) * (1.0 - false_alarm_rate) > n:
        return math.inf
    return quantile_threshold(reference, 0.0, false_alarm_rate)


def percent(fraction: float, smallest: float = 1e-5) -> str:
    """A rate as a person reads it: one decimal, two significant digits where that would show ``smallest`` or more
    as 0.0% (below it, 0.0% is what it is: a realised rate of 2e-7 reads 0.0%; every budget, down to
    ``MIN_FALSE_ALARM_RATE``, shows its digits: ``percent(rate, MIN_FALSE_ALARM_RATE)``)."""
    text = f"{fraction:.1%}"
    return f"{100 * fraction:.2g}%" if text == "0.0%" and fraction >= smallest else text


def model_of(method: str) -> str:
    """What a method assumes of the good parts' scores, as the confidence statement names it."""
    if method == "lot_quantile":
        return "order statistic"
    return "exponential tail" if method in EXPONENTIAL_FROM or method == "quartile_conformal" else "gaussian"


@functools.lru_cache(maxsize=256)
def model_realised_rates(method: str, n: int, rate: float) -> np.ndarray:
    """The false-alarm rates that lots of ``n`` good parts realise on new ones when their scores are what ``method``
    assumes (``model_of``: Exp(1) for the tail models, N(0, 1) for the Gaussian ones), each lot's threshold read by
    ``calibrate`` itself: the methods are scale- and shift-free, so one seeded draw serves every lot of this size.
    The order statistic's Beta law stood for every method before, which held for 84% of lots of 36 at 5% for the
    default on its own model, and put its mean realised rate (2.2% at 1%, not 1%) out of sight."""
    rng = np.random.default_rng([n, int(round(rate * 1e9))])
    lots = max(MODEL_LOTS_MIN, min(MODEL_LOTS, MODEL_DRAWS // max(n, 1)))
    exponential = model_of(method) == "exponential tail"
    thresholds = np.empty(lots)
    for i in range(lots):
        scores = rng.exponential(size=n) if exponential else rng.standard_normal(n)
        thresholds[i] = calibrate(scores, None, rate, method).threshold
    return np.sort(np.exp(-np.maximum(thresholds, 0.0)) if exponential else norm.sf(thresholds))


def images_needed(false_alarm_rate: float) -> int:
    """Reference images for a threshold at most one tail scale beyond the largest of them: (n + 1) rate >= 1/e."""
    return max(2, math.ceil(1.0 / (math.e * false_alarm_rate)) - 1)


@dataclass(frozen=True)
class Calibration:
    method: str
    centre: float
    spread: float
    false_alarm_rate: float
    n_images: int
    # lot_quantile, trimmed_tail: the sorted lot scores the threshold reads (suspected defects left out) and how many
    # were left out
    reference: tuple[float, ...] = ()
    n_excluded: int = 0

    def __post_init__(self):
        check_tail_reach(self.method, self.false_alarm_rate)  # refused when made, not when first decided with
        if not (self.n_images >= 1 and 0 <= self.n_excluded < self.n_images):
            raise DecisionError(f"a calibration reads at least one lot image, got {self.n_images} with "
                                f"{self.n_excluded} left out")

    @property
    def threshold(self) -> float:
        if self.method == "lot_quantile":
            return quantile_threshold(self.reference, self.spread, self.false_alarm_rate)
        if self.method == "quartile_conformal":
            return min(threshold_for(self.centre, self.spread, self.false_alarm_rate, "quartile_exponential"),
                       conformal_cap(self.reference, self.false_alarm_rate))
        return threshold_for(self.centre, self.spread, self.false_alarm_rate, self.method)

    def with_rate(self, false_alarm_rate: float | None) -> "Calibration":
        if false_alarm_rate is None:
            return self
        return Calibration(self.method, self.centre, self.spread, check_false_alarm_rate(false_alarm_rate),
                           self.n_images, self.reference, self.n_excluded)

    def calibrated(self, scores) -> np.ndarray:
        """Raw scores -> 0-1, 0.5 at the threshold (NaN stays NaN)."""
        z = (np.asarray(scores, dtype=np.float64) - self.threshold) / self.spread
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))

    def raw(self, calibrated: float) -> float:
        """The raw score whose calibrated score is ``calibrated`` (strictly between 0 and 1): ``calibrated``'s
        inverse, e.g. a user's calibrated threshold in map units."""
        return float(self.threshold + self.spread * np.log(calibrated / (1.0 - calibrated)))

    def realised_range(self) -> tuple[float, float, float]:
        """(low, median, high): the ``CONFIDENCE`` range of false-alarm rates that lots of this size realise on new
        good parts, and the median lot's. ``lot_quantile``: its order statistic at rank (n + 1)(1 - budget),
        Beta((n + 1) budget, (n + 1)(1 - budget)) over clean lots whatever their scores; the other methods: lots
        whose scores are what the method assumes (``model_realised_rates``). A heavier tail than the model's realises
        more, a lighter one less, and a lot's defects less."""
        rate = self.false_alarm_rate
        tail = (1.0 - CONFIDENCE) / 2
        n = self.n_images - self.n_excluded
        if self.method != "lot_quantile":
            realised = model_realised_rates(self.method, self.n_images, rate)
            low, median, high = (float(np.quantile(realised, q)) for q in (tail, 0.5, 1.0 - tail))
            return low, median, high
        a, b = (n + 1) * rate, (n + 1) * (1.0 - rate)
        low, median, high = (float(beta_distribution.ppf(q, a, b)) for q in (tail, 0.5, 1.0 - tail))
        if a < 1.0:  # the rank lies past the lot's largest score: a threshold read there is no surer than that
            # score, whose rate is Beta(1, n) over lots (the rank's own Beta squeezed toward 0: 2 images at 0.1%
            # read "0.0% to 0.0%" where such lots realise up to 77.6%)
            high = max(high, float(beta_distribution.ppf(1.0 - tail, 1.0, n)))
        return low, median, high

    @property
    def tied(self) -> bool:
        """Whether the lot's scale is the floor, not a measurement (the scores it reads tied): a threshold a hair
        above the tied value, which new parts cross far more often than the budget says."""
        return self.spread <= spread_floor(self.centre) * (1.0 + 1e-9)

    def confidence(self) -> dict:
        """How sure the threshold is: the range of false-alarm rates lots of this size realise on new good parts
        (``CONFIDENCE`` of them, ``realised_range``), whether it is provisional, and a sentence that says so."""
        rate = self.false_alarm_rate
        n = self.n_images - self.n_excluded  # the scores the threshold reads
        low, median, high = self.realised_range()
        needed = images_needed(rate)
        model = model_of(self.method)
        assumed = "for clean lots" if model == "order statistic" else f"for scores with the {model} it assumes"
        budget = percent(rate, MIN_FALSE_ALARM_RATE)  # 1e-6 to 1e-5 read "a 0.0% budget"
        # "images", not "lot images": a grown bank reads its updates' parts too (a lot of 24 said "from 30 lot images")
        sentence = (f"threshold from {n} images at a {budget} budget: {CONFIDENCE:.0%} of such lots "
                    f"realise {percent(low)} to {percent(high)} false alarms on new good parts, half of them above "
                    f"{percent(median)} ({assumed})")
        if self.n_excluded:
            sentence += f" ({self.n_excluded} lot image{'s' if self.n_excluded > 1 else ''} left out as suspected " \
                        "defects)"
        why = []
        if n < needed:
            why.append(f"{n} images cannot measure a {budget} tail, collect {needed}+ good images")
        if self.tied:
            why.append("the lot's scores are tied where the threshold reads them, so its scale is a floor, not a "
                       "measurement: collect good images whose scores vary")
        if why:
            sentence += "; provisional: " + "; ".join(why)
        return {"realised_low": low, "realised_median": median, "realised_high": high, "model": model,
                "reference_images": n, "images_needed": needed, "provisional": bool(why), "text": sentence}

    def to_dict(self) -> dict:
        out = {"method": self.method, "centre": self.centre, "spread": self.spread,
               "false_alarm_rate": self.false_alarm_rate, "n_images": self.n_images}
        if self.reference:  # every method keeps the scores it read (a grown bank reads its threshold again)
            out.update(reference=list(self.reference), n_excluded=self.n_excluded)
        return {**out, "threshold": self.threshold, "confidence": self.confidence()}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        method = str(d["method"])
        if method not in METHODS:
            raise DecisionError(f"unknown decision method {method!r}; one of {', '.join(METHODS)}")
        reference = tuple(float(v) for v in d.get("reference", ()))
        if (method in READS_REFERENCE or reference) and (len(reference) < 2 or not all(map(math.isfinite, reference))
                                                          or any(b < a for a, b in zip(reference, reference[1:]))):
            raise DecisionError(f"a {method} calibration needs at least 2 finite, sorted reference scores")
        cal = cls(method, float(d["centre"]), float(d["spread"]), check_false_alarm_rate(d["false_alarm_rate"]),
                  int(d["n_images"]), reference, int(d.get("n_excluded", 0)))
        if not (math.isfinite(cal.centre) and math.isfinite(cal.spread) and cal.spread > 0):
            raise DecisionError(f"a calibration needs a finite centre and a positive spread, got {cal.centre}, "
                                f"{cal.spread}")
        return cal


LOWER_GROUP_LEVEL = 1e-4  # mostly_defective_group: how far past its own tail a score must lie to stay out
LOWER_GROUP_START = 12  # ... and the fewest lowest scores its group starts from (at least a quarter of the lot)
LOWER_GROUP_SHARE = 1 / 6  # ... and the share of the lot that must lie above the group (benchmarks.line.MIN_BREAKDOWN)


def mostly_defective_group(scores) -> int | None:
    """How many of the lot's lowest scores form a group the rest lies far above, where more than a sixth of the lot
    does (None: no such group). From the lowest quarter (at least ``LOWER_GROUP_START``), the next score joins while
    the group's own quartile threshold at ``LOWER_GROUP_LEVEL`` lies at or above it. A lot mostly defective whose
    defects lie above its good parts' tail has one (MVTec bottle's test set: its 20 good bottles and 3 defects in
    the group, 60 defects above it), but so does a clean lot with near-twins in it (4 of ball screw's 40 line
    lots), so it is a note for the user, never a threshold (README, "A lot mostly defective")."""
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    s = s[np.isfinite(s)]
    n = len(s)
    k = max(LOWER_GROUP_START, math.ceil(n / 4))
    if n - k <= LOWER_GROUP_SHARE * n:
        return None
    while k < n and s[k] <= calibrate(s[:k], None, LOWER_GROUP_LEVEL, DEFAULT_METHOD).threshold:
        k += 1
    return k if n - k > LOWER_GROUP_SHARE * n else None


def mostly_defective_note(calibration: "Calibration", threshold: float) -> str | None:
    """What a lot with a ``mostly_defective_group`` should know (None: nothing): how many lie above the group, how
    many of them ``threshold`` (the automatic one: a user's own is not what the note speaks of) calls anomalous,
    and the ``--threshold`` (calibrated) that reads the group alone.
    Nothing where ``threshold`` calls at least half of those above the group anomalous: the demo lot's 4 defective
    washers of 24 (5 above its group, 4 called) need no word."""
    group = mostly_defective_group(calibration.reference)
    if group is None:
        return None
    s = np.sort(np.asarray(calibration.reference, dtype=np.float64))
    above, called = len(s) - group, int(np.sum(s > threshold))
    if called >= above / 2:
        return None
    own = calibrate(s[:group], None, calibration.false_alarm_rate, DEFAULT_METHOD).threshold
    asked = float(f"{float(calibration.calibrated([own])[0]):.3g}")  # as a user types it
    by_hand = (f"read from the lowest {group} alone the threshold is --threshold {asked:g} (it calls "
               f"{int(np.sum(s > calibration.raw(asked)))} of the {len(s)} anomalous)" if 0.0 < asked < 1.0 else
               "set --threshold by hand")
    return (f"{above} of the lot's {len(s)} images score far above its lowest {group}, and the automatic threshold "
            f"calls {called} of the lot anomalous. If this lot is mostly defective (a benchmark's test set), its "
            f"quartiles are defects' scores and the automatic threshold misses them: {by_hand}. A clean lot holding "
            f"near-identical parts can look like this too; then keep the automatic threshold (README, 'A lot mostly "
            f"defective')")


def check_false_alarm_rate(rate) -> float:
    rate = float(rate)
    if not (math.isfinite(rate) and MIN_FALSE_ALARM_RATE <= rate < 0.5):
        raise DecisionError(f"the false-alarm rate must be a fraction between {MIN_FALSE_ALARM_RATE:g} and 0.5 (e.g. "
                            f"0.01 for 1% of good parts called defective), got {rate}")
    return rate


def check_calibrated_threshold(value) -> float:
    """A user's threshold on the calibrated scale: strictly between 0 and 1 (0.5 = the automatic threshold)."""
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise DecisionError(f"a threshold is a calibrated score strictly between 0 and 1 (0.5 is the bank's "
                            f"automatic threshold; higher calls fewer parts defective), got {value}")
    return value


def check_tail_reach(method: str, false_alarm_rate: float) -> None:
    """An exponential tail model describes the scores above the lot's quantile where it starts: a budget past that
    fraction is not one it can spend (it was read as that fraction)."""
    if method in EXPONENTIAL_FROM and false_alarm_rate > 1.0 - EXPONENTIAL_FROM[method]:
        raise DecisionError(f"the {method} method models the good parts' tail above the lot's "
                            f"{EXPONENTIAL_FROM[method]:.0%} quantile: a budget of at most "
                            f"{1.0 - EXPONENTIAL_FROM[method]:.0%}, got {false_alarm_rate:.1%}")


def threshold_for(centre: float, spread: float, false_alarm_rate: float, method: str) -> float:
    """The parametric methods: Gaussian ones centre + z * spread; exponential ones centre (where the tail starts)
    + spread * ln(tail fraction / rate)."""
    if method in EXPONENTIAL_FROM:
        check_tail_reach(method, false_alarm_rate)
        return float(centre + spread * math.log((1.0 - EXPONENTIAL_FROM[method]) / false_alarm_rate))
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
    reference, excluded = (), 0
    if method == "lot_quantile":
        ordered = np.sort(scores)
        excluded = trim_suspected_defects(ordered)
        kept = ordered[:len(ordered) - excluded]
        centre, spread = float(np.median(kept)), tail_scale(kept)
        reference = tuple(float(v) for v in kept)
    elif method == "lower_half":
        below = scores[scores < centre] - centre
        spread = float(np.sqrt(np.mean(below ** 2))) if below.size else 0.0
    elif method == "mad":
        spread = 1.4826 * float(np.median(np.abs(scores - centre)))
    elif method == "upper_quartile":
        spread = (float(np.quantile(scores, 0.75)) - centre) / norm.ppf(0.75)
    elif method in ("quartile_exponential", "quartile_conformal"):
        spread = (float(np.quantile(scores, 0.75)) - centre) / math.log(2.0)
    elif method in ("exponential_tail", "trimmed_tail"):
        kept = scores
        if method == "trimmed_tail":
            ordered = np.sort(scores)
            excluded = trim_suspected_defects(ordered)
            kept = ordered[:len(ordered) - excluded]
            reference = tuple(float(v) for v in kept)
        centre = float(np.quantile(kept, EXPONENTIAL_FROM[method]))
        excess = kept[kept > centre] - centre
        spread = float(np.median(excess)) / math.log(2.0) if excess.size else 0.0
    else:
        chosen = scores if normal_indices is None else raw[np.asarray(normal_indices, dtype=np.int64)]
        chosen = chosen[np.isfinite(chosen)]
        if chosen.size < 2:
            chosen = scores
        centre, spread = float(np.mean(chosen)), float(np.std(chosen, ddof=1))
    spread = max(spread, spread_floor(centre))
    if not reference:  # the scores it read, kept whatever the method
        reference = tuple(float(v) for v in np.sort(scores))
    return Calibration(method, centre, spread, false_alarm_rate, int(scores.size), reference, excluded)


OUT_OF_DISTRIBUTION = "out_of_distribution"  # the decision of an image unlike the bank's lot as a whole (ood.py)
# said of one out of distribution that scores anomalous: the map's upper quartile moves for another product and for
# a defect over much of the part alike (all six broken_large bottles were out of distribution), so both are named
OVER_THRESHOLD_NOTE = "its score is above the threshold too: a defect over much of the part looks like this as well"
DECISIONS = ("normal", "anomalous", OUT_OF_DISTRIBUTION, "invalid")


def decide(calibrated_scores, threshold: float = 0.5) -> list[str]:
    """'anomalous' above the threshold, 'normal' at or below it, 'invalid' for NaN (calibrated scores and a
    threshold on that scale, or raw scores and a raw threshold: ``Decider.decide``)."""
    out = []
    for c in np.asarray(calibrated_scores, dtype=np.float64).reshape(-1):
        out.append("invalid" if not np.isfinite(c) else "anomalous" if c > threshold else "normal")
    return out


def map_level(map_statistic: float, score: float, threshold: float, rescore_weight: float) -> float:
    """The map value that belongs to an image's decision, for the outline of its heat map.

    ``map_statistic`` is the image score its map alone gives (``kernels.image_scores``); lot-level re-scoring moves
    the score by ``w`` toward its neighbours' mean m: score = (1 - w) * statistic + w * m. So the score crosses
    ``threshold`` exactly when the statistic crosses statistic + (threshold - score) / (1 - w): for the map's
    maximum, an image is anomalous exactly when some pixel lies above this level. With w = 1 the map plays no part
    and the level is the statistic itself.
    """
    keep = 1.0 - float(rescore_weight)
    if keep <= 1e-6:
        return float(map_statistic)
    return float(map_statistic + (threshold - score) / keep)


@dataclass(frozen=True)
class Decider:
    """Decisions for images scored against one bank: its calibration (at the budget asked for), the user's threshold
    on the calibrated scale (None: the automatic one, 0.5) and what the bank's scores are made of, so that the
    outline of a heat map marks the level that belongs to the decision (``map_level``)."""

    calibration: Calibration
    threshold_calibrated: float | None = None
    image_score: str = "max"
    image_topk_fraction: float = 0.01
    rescore_weight: float = 0.0  # 0 when the bank does not re-score
    ood: object | None = None  # the bank's OodCalibration (postprocess/ood.py); None: no such decisions

    @classmethod
    def for_bank(cls, info: dict, false_alarm_rate: float | None = None,
                 threshold_calibrated: float | None = None) -> "Decider | None":
        """From a bank's summary (the ``info`` action: ``decision`` and ``config``); None for a bank built before
        banks kept a calibration."""
        if "decision" not in info:
            return None
        from .ood import OodCalibration

        config = info.get("config", {})
        rescoring = int(config.get("rescore_k", 0)) > 0
        ood = None if info.get("ood") is None else OodCalibration.from_dict(info["ood"])
        return cls(Calibration.from_dict(info["decision"]).with_rate(false_alarm_rate), threshold_calibrated,
                   str(config.get("image_score", "max")), float(config.get("image_topk_fraction", 0.01)),
                   float(config.get("rescore_weight", 0.0)) if rescoring else 0.0, ood)

    @property
    def raw_threshold(self) -> float:
        """The threshold in raw score units: the automatic one, or the user's calibrated one."""
        if self.threshold_calibrated is None:
            return self.calibration.threshold
        return self.calibration.raw(self.threshold_calibrated)

    def decide(self, score: float, anomaly_map=None, image=None) -> dict:
        """``calibrated``, ``decision`` and, given the image's map, ``level``: the map value its outline marks; given
        its map and the image sent (uint8 [H, W, 3]) as well, an image outside the bank's out-of-distribution
        thresholds is decided ``out_of_distribution`` whatever its score, with ``ood_reason``."""
        calibrated = float(self.calibration.calibrated(score))
        # decided in raw units, where the outline's level is read: the calibrated scale saturates (1e-30 or 1 - 1e-17
        # as --threshold: every image "anomalous", or none, whatever its map)
        out = {"calibrated": calibrated, "decision": decide([score], self.raw_threshold)[0]}
        if anomaly_map is None or not np.isfinite(score):
            return out
        amap = np.asarray(anomaly_map, dtype=np.float32)
        if self.ood is not None and image is not None:
            from .ood import image_statistics, reason

            outside, why = self.ood.outside(image_statistics(amap[None], np.asarray(image)[None], self.ood.statistics))
            if outside[0]:
                # the score's own verdict is kept beside it: a part above the threshold is not passed because it
                # is also unlike the lot (--fail-on anomalous counts it)
                out["over_threshold"] = out["decision"] == "anomalous"
                out["decision"], out["ood_reason"] = OUT_OF_DISTRIBUTION, reason(why[0])
        statistic = float(image_scores(amap[None], self.image_score, self.image_topk_fraction)[0])
        out["level"] = map_level(statistic, float(score), self.raw_threshold, self.rescore_weight)
        return out


__all__ = ["Calibration", "Decider", "DecisionError", "DECISIONS", "OUT_OF_DISTRIBUTION", "METHODS", "DEFAULT_METHOD",
           "DEFAULT_FALSE_ALARM_RATE", "calibrate", "check_calibrated_threshold", "conformal_cap",
           "check_false_alarm_rate", "decide", "images_needed", "map_level", "threshold_for"]
