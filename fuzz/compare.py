"""Equality of decoded values for the targets' round-trip checks: arrays by dtype, shape and
values (NaN equal to NaN), containers item by item."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        if not (isinstance(a, np.ndarray) and isinstance(b, np.ndarray)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        nan_aware = a.dtype.kind in "fc"
        return bool(np.array_equal(a, b, equal_nan=nan_aware))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and bool(a == b)


def check_same(what: str, a: Any, b: Any) -> None:
    if not same(a, b):
        raise AssertionError(f"{what}: {a!r:.300} became {b!r:.300}")
