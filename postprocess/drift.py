"""Running statistics of the new images a bank scores (issue 27): what the line looks like now against the lot the
bank was built on.

Per bank, the scoring service keeps a window of the latest ``WINDOW`` new images (lot images sent again are not
new): their scores' quantiles, the share decided out of distribution, and a drift statistic: the two-sample
Kolmogorov-Smirnov distance between the window's whole-image statistic (``postprocess.ood``) and the lot's own values
of it. A lamp that ages or a camera that is bumped moves every part's statistic a little, which no single image's
decision shows; the window does. The alarm is raised when the distance exceeds what ``ALARM_P`` of windows drawn from
the lot's own distribution would reach (the KS test's p-value below it), once the window holds ``MIN_IMAGES``.
"""

from __future__ import annotations

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
    reference: np.ndarray  # the lot's values of the whole-image statistic
    scores: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    values: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    flagged: deque = field(default_factory=lambda: deque(maxlen=WINDOW))
    seen: int = 0
    updated: float = 0.0

    def summary(self) -> dict:
        """Quantiles of the window's scores, its out-of-distribution rate, the drift distance and whether it alarms."""
        n = len(self.scores)
        out = {"version": self.version, "window": n, "seen": self.seen, "updated": self.updated,
               "score_quantiles": {str(q): float(np.quantile(np.asarray(self.scores), q)) for q in QUANTILES} if n
               else {}, "ood_rate": float(np.mean(self.flagged)) if n else 0.0, "drift": 0.0, "drift_p": 1.0,
               "alarm": False}
        if n and len(self.reference) >= 2:
            test = ks_2samp(np.asarray(self.values), self.reference)
            out.update(drift=float(test.statistic), drift_p=float(test.pvalue),
                       alarm=bool(n >= MIN_IMAGES and test.pvalue < ALARM_P))
        return out


class DriftMonitor:
    """Windows of every bank this process scores with (thread-safe: a model instance may serve several threads)."""

    def __init__(self):
        self._windows: dict = {}
        self._lock = threading.Lock()

    def observe(self, bank_id: str, version: str, reference, scores, values, flagged) -> dict:
        """Add the new images of one request; a new version of the bank starts a new window. Returns the summary."""
        with self._lock:
            window = self._windows.get(bank_id)
            if window is None or window.version != version:
                window = self._windows[bank_id] = BankWindow(version, np.asarray(reference, dtype=np.float64))
            window.scores.extend(float(s) for s in scores)
            window.values.extend(float(v) for v in values)
            window.flagged.extend(bool(f) for f in flagged)
            window.seen += len(scores)
            window.updated = time.time()
            return window.summary()

    def summary(self, bank_id: str) -> dict | None:
        with self._lock:
            window = self._windows.get(bank_id)
            return None if window is None else window.summary()
