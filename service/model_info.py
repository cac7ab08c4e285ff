"""The `model_info` rt_info section of an IR, in the OpenVINO Model API convention.

Model API and OpenVINO Training Extensions read and write these keys, so our IRs load there and
theirs load here. Values are strings in the IR; this dataclass holds them typed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import openvino as ov

SECTION = "model_info"
# The project's own keys, optional strings stored as they are (Model API ignores keys it does
# not know).
OWN_KEYS = ("saliency_method", "saliency_target_layer", "saliency_settings",
            "saliency_map_precision")


@dataclass
class ModelInfo:
    labels: list[str]
    input_height: int
    input_width: int
    mean_values: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    scale_values: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    reverse_input_channels: bool = False  # our IR input is RGB already
    resize_type: str = "standard"
    embedded_processing: bool = False
    pad_value: int = 0
    # OWN_KEYS, the project's own
    saliency_method: str | None = None
    saliency_target_layer: str | None = None
    saliency_settings: str | None = None
    saliency_map_precision: str | None = None  # f32, or int8 where the map product is INT8

    def write(self, model: ov.Model) -> None:
        values = {
            "model_type": "Classification",
            "labels": " ".join(label.replace(" ", "_") for label in self.labels),
            "mean_values": " ".join(f"{v:g}" for v in self.mean_values),
            "scale_values": " ".join(f"{v:g}" for v in self.scale_values),
            "reverse_input_channels": str(self.reverse_input_channels),
            "resize_type": self.resize_type,
            "embedded_processing": str(self.embedded_processing),
            "pad_value": str(self.pad_value),
            "orig_height": str(self.input_height),
            "orig_width": str(self.input_width),
            "output_raw_scores": "True",
            "topk": "1",
            "multilabel": "False",
        }
        for key in OWN_KEYS:
            if getattr(self, key) is not None:
                values[key] = getattr(self, key)
        for key, value in values.items():
            model.set_rt_info(value, [SECTION, key])

    @classmethod
    def from_model(cls, model: ov.Model) -> "ModelInfo | None":
        """Read the section, or None when the IR has none."""
        if not model.has_rt_info(SECTION):
            return None

        def get(key: str, default: str | None = None) -> str | None:
            if model.has_rt_info([SECTION, key]):
                return model.get_rt_info([SECTION, key]).astype(str)
            return default

        def floats(key: str, default: str) -> list[float]:
            return [float(v) for v in (get(key, default) or default).split()]

        shape = model.inputs[0].get_partial_shape()
        layout_nhwc = shape.rank.get_length() == 4 and shape[3].is_static and \
            shape[3].get_length() == 3
        h_dim, w_dim = (shape[1], shape[2]) if layout_nhwc else (shape[2], shape[3])
        height = int(get("orig_height", "0") or 0) or (h_dim.get_length() if h_dim.is_static else 0)
        width = int(get("orig_width", "0") or 0) or (w_dim.get_length() if w_dim.is_static else 0)
        return cls(
            labels=(get("labels", "") or "").split(),
            input_height=height,
            input_width=width,
            mean_values=floats("mean_values", "0 0 0"),
            scale_values=floats("scale_values", "1 1 1"),
            reverse_input_channels=(get("reverse_input_channels", "False") or "").lower()
            in ("true", "yes", "1"),
            resize_type=get("resize_type", "standard") or "standard",
            embedded_processing=(get("embedded_processing", "False") or "").lower()
            in ("true", "yes", "1"),
            pad_value=int(float(get("pad_value", "0") or 0)),
            **{key: get(key) for key in OWN_KEYS},
        )
