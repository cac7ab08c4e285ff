"""Saliency insertion: `insert_saliency(model, settings)` adds a `saliency_map` output."""

from __future__ import annotations

import openvino as ov

from .graph import InsertionError
from .methods import METHODS, Insertion, SaliencySettings, create_method

__all__ = ["InsertionError", "Insertion", "METHODS", "SaliencySettings", "insert_saliency"]


def insert_saliency(model: ov.Model, settings: SaliencySettings | None = None
                    ) -> tuple[ov.Model, Insertion | None]:
    """Return a new model with a `saliency_map` output, or the model as it is for method none."""
    settings = settings or SaliencySettings()
    if settings.method == "none":
        return model, None
    return create_method(settings, model).insert(model)
