"""JSON as the project reads what it is handed (request options, bank manifests, encoder fingerprints, tokenizer
files): a key given twice and the non-JSON constants NaN / Infinity are refused, never resolved silently (Python's
``json`` keeps the last of two equal keys and reads ``NaN``)."""

from __future__ import annotations

import json
import math


class JsonRefused(ValueError):
    """Text that Python's json would read, but not the way its writer meant."""


def _refuse_duplicates(pairs: list) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise JsonRefused(f"duplicate key {key!r} in a JSON object: send each key once")
        seen[key] = value
    return seen


def _refuse_constant(name: str):
    raise JsonRefused(f"{name} is not JSON: send numbers")


def loads(text: str | bytes):
    """``json.loads`` that raises ``JsonRefused`` for a repeated key or NaN/Infinity (and ValueError for bad JSON)."""
    return json.loads(text, object_pairs_hook=_refuse_duplicates, parse_constant=_refuse_constant)


def finite(value):
    """``value`` with every non-finite float (a score that could not be computed) as None: what ``dumps`` writes."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    """``json.dumps`` that writes JSON ``loads`` reads back: NaN and infinities as null, never the non-JSON
    constants."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)
