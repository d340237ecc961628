"""Value types with stated ranges for every number a command takes (argparse ``type=``), one helper for all the
commands as ``config.RANGES`` is for the algorithm: a bad value is refused before any work, with the range and what
was given, e.g. ``argument --batch-size: must be an integer in [1, 64], got '0'`` (exit status 2)."""

from __future__ import annotations

import argparse
import math

from .config import RANGES


class Bounded:
    """A number of ``kind`` (int or float) between ``low`` and ``high``; ``open_low`` / ``open_high`` leave an end
    out. Integers must be written as integers ("8", not "8.0")."""

    def __init__(self, kind: type, low, high, open_low: bool = False, open_high: bool = False):
        self.kind, self.low, self.high, self.open_low, self.open_high = kind, low, high, open_low, open_high
        self.__name__ = self.describe()  # what argparse names when it reports the type

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        return f"{noun} in {'(' if self.open_low else '['}{self.low}, {self.high}{')' if self.open_high else ']'}"

    def contains(self, value) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if self.kind is float and not math.isfinite(value) or not self.contains(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return value

    def __repr__(self) -> str:
        return f"Bounded({self.describe()})"


def integer(low: int, high: int) -> Bounded:
    return Bounded(int, low, high)


def number(low: float, high: float, open_low: bool = False, open_high: bool = False) -> Bounded:
    return Bounded(float, low, high, open_low, open_high)


def setting(name: str, kind: type) -> Bounded:
    """The range ``config.RANGES`` states for a PA-CLIP setting of ``kind``, as a command-line type."""
    low, high, closed = RANGES[name]
    return Bounded(kind, low, high, open_low=not closed)


PORT = integer(1, 65535)
FRACTION = number(0.0, 1.0, open_low=True, open_high=True)  # strictly between 0 and 1
FALSE_ALARM_RATE = number(1e-6, 0.5, open_high=True)  # decision.check_false_alarm_rate's range
IMAGE_SIDE = integer(14, 4096)  # one patch at the smallest; the encoders refuse more than twice their size anyway
SECONDS = number(0.0, 86400.0, open_low=True)


__all__ = ["Bounded", "integer", "number", "setting", "PORT", "FRACTION", "FALSE_ALARM_RATE", "IMAGE_SIDE", "SECONDS"]
