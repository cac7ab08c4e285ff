"""JSON that every parser reads. JSON has no NaN or infinity, yet Python writes them (as bare
NaN, which JSON.parse and jq reject): an undefined correlation, a game that could not be
played or a model that computes NaN becomes null instead."""

from __future__ import annotations

import json
import math


def finite(value):
    """The same structure with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def dumps(value, **options) -> str:
    return json.dumps(finite(value), allow_nan=False, **options)
