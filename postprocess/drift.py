"""Running statistics of the new images a bank scores (issue 27): what the line looks like now against the lot the
bank was built on.

Per bank, the scoring service keeps a window of the latest ``WINDOW`` new images (lot images sent again are not
new): their scores' quantiles, the share decided out of distribution, and a drift statistic: the two-sample
Kolmogorov-Smirnov distance between the window's values of each whole-image statistic of the bank's
out-of-distribution calibration (``postprocess.ood``: the map's upper quartile, brightness, contrast) and the lot's
own values of it. A lamp that ages or a camera that is bumped moves every part's statistic a little, which no single
image's decision shows; the window does. The alarm is raised when the window is less likely than ``ALARM_P`` under
the lot's own distribution in any statistic (the smallest KS p-value times the number of statistics, Bonferroni),
once the window holds ``MIN_IMAGES``. Every statistic, not the map's alone: a magnetic tile's brightness varies 4x
across its lot, so a line darkened to half is within every single tile's range (no image is out of distribution),
yet a window of 32 darkened tiles is far outside the lot's brightness distribution (``python -m benchmarks.ood
report``, drift table); the map's statistic does not move with it.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import ks_2samp

WINDOW = 256  # new images per bank the statistics describe
MIN_IMAGES = 32  # fewer say too little for an alarm
ALARM_P = 1e-3  # a window this unlikely under the lot's distribution raises the alarm
QUANTILES = (0.5, 0.9, 0.99)


@dataclass
class BankWindow:
    version: str
    reference: dict  # statistic -> the lot's values of it
    scores: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    values: dict = field(default_factory=dict)  # statistic -> the window's values of it
    flagged: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    keys: deque = field(default_factory=lambda: deque(maxlen=WINDOW))  # each image's key (None: not known)
    seen: int = 0
    updated: float = 0.0
    lot: tuple = (0, "")  # the version's lot: how many keys, and their digest (``lot_digest``)

    def summary(self) -> dict:
        """Quantiles of the window's scores, its out-of-distribution rate, the drift distance and whether it alarms."""
        n = len(self.scores)
        out = {"version": self.version, "lot": list(self.lot), "window": n, "seen": self.seen, "updated": self.updated,
               "score_quantiles": {str(q): float(np.quantile(np.asarray(self.scores), q)) for q in QUANTILES} if n
               else {}, "ood_rate": float(np.mean(self.flagged)) if n else 0.0, "drift": 0.0, "drift_p": 1.0,
               "alarm": False}
        if n:
            out.update(drift_test(self.reference, self.values))
        return out


def drift_test(reference: dict, values: dict) -> dict:
    """A window's values of each statistic against the lot's: the largest KS distance (``drift``), the smallest
    p-value times the statistics tested (``drift_p``), the statistic it came from and whether the window alarms."""
    tests = {name: ks_2samp(np.asarray(values[name], dtype=np.float64), lot) for name, lot in reference.items()
             if len(lot) >= 2 and len(values[name])}
    if not tests:
        return {}
    name = min(tests, key=lambda k: (tests[k].pvalue, -tests[k].statistic))  # the least likely under the lot
    p = min(1.0, float(tests[name].pvalue) * len(tests))
    n = len(next(iter(values.values())))
    return {"drift": max(float(t.statistic) for t in tests.values()), "drift_p": p, "statistic": name,
            "alarm": bool(n >= MIN_IMAGES and p < ALARM_P)}


def lot_digest(keys) -> str:
    """One digest of a lot's image keys in order: a grown bank's lot begins with the lot it grew from."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def grown_from(manifest, lot) -> bool:
    """Whether ``manifest``'s version was grown by updates (``accept_level`` is set by updates alone) from the version
    whose lot is ``lot`` ((n, digest), a window's ``lot``): its lot begins with that lot. A rebuild is not."""
    try:
        n, digest = int(lot[0]), str(lot[1])
    except (TypeError, ValueError, IndexError):  # no lot recorded (a window written before it was)
        return False
    keys = manifest.image_keys
    return manifest.accept_level is not None and bool(digest) and 0 < n <= len(keys) and lot_digest(keys[:n]) == digest


class DriftMonitor:
    """Windows of every bank this process scores with (thread-safe: a model instance may serve several threads)."""

    def __init__(self):
        self._windows: dict = {}
        self._lock = threading.Lock()

    def observe(self, bank_id: str, version: str, references: dict, scores, values: dict, flagged,
                keys=None, lot_keys=None) -> dict:
        """Add the new images of one request (``values``: statistic -> their values, as ``references`` holds the
        lot's; ``keys``: each image's ``bank.image_key``); a new version of the bank starts a new window. An image
        already in the window (a part inspected again, a request sent again) is not added twice: the window
        describes distinct parts, and one part repeated would fill it with one value and raise the alarm. Returns
        the summary. ``lot_keys``: the version's lot (its manifest's ``image_keys``), read when a window starts, so
        that a version grown from it carries the window on (``carry``)."""
        keys = [None] * len(scores) if keys is None else list(keys)
        with self._lock:
            window = self._windows.get(bank_id)
            if window is None or window.version != version:
                window = self._windows[bank_id] = BankWindow(
                    version, {k: np.asarray(v, dtype=np.float64) for k, v in references.items()},
                    values={k: deque(maxlen=WINDOW) for k in references},
                    lot=(0, "") if lot_keys is None else (len(lot_keys), lot_digest(lot_keys)))
            held = set(window.keys) - {None}
            for i, key in enumerate(keys):
                if key is not None and key in held:
                    continue
                if not (math.isfinite(float(scores[i])) and all(math.isfinite(float(values[name][i]))
                                                                for name in window.values)):
                    continue  # no score to compare (an invalid image): NaN would also make the window unreadable JSON
                held.add(key)
                window.keys.append(key)
                window.scores.append(float(scores[i]))
                for name, column in window.values.items():
                    column.append(float(values[name][i]))
                window.flagged.append(bool(flagged[i]))
                window.seen += 1
            window.updated = time.time()
            return window.summary()

    def summary(self, bank_id: str) -> dict | None:
        with self._lock:
            window = self._windows.get(bank_id)
            return None if window is None else window.summary()

    def bank_ids(self) -> list[str]:
        with self._lock:
            return list(self._windows)

    def version(self, bank_id: str) -> str | None:
        """The bank version whose window is held, None when none is."""
        with self._lock:
            window = self._windows.get(bank_id)
            return None if window is None else window.version

    def carry(self, bank_id: str, manifest, references: dict) -> bool:
        """Carry the bank's window on to ``manifest``'s version where an update grew it from the window's
        (``grown_from``): an update folds good parts in, it does not start the line again, and each update started a
        new window, so that a line grown every hour never gathered the parts an alarm needs. The window's parts are
        kept; the lot's values it is tested against (``references``) are the new version's. False (nothing changed)
        when no window is held or the version did not grow from its lot: a rebuild starts a new one."""
        with self._lock:
            window = self._windows.get(bank_id)
            if window is None or not grown_from(manifest, window.lot):
                return False
            window.version = manifest.version
            window.reference = {k: np.asarray(v, dtype=np.float64) for k, v in references.items()}
            window.lot = (len(manifest.image_keys), lot_digest(manifest.image_keys))
            return True

    def forget(self, bank_id: str) -> None:
        with self._lock:
            self._windows.pop(bank_id, None)
