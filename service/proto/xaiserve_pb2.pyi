from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Method(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METHOD_AUTO: _ClassVar[Method]
    METHOD_WHITE_BOX: _ClassVar[Method]
    METHOD_BLACK_BOX: _ClassVar[Method]

class MapFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MAP_FORMAT_FLOAT: _ClassVar[MapFormat]
    MAP_FORMAT_U8_IMAGE: _ClassVar[MapFormat]
    MAP_FORMAT_PNG_HEATMAP: _ClassVar[MapFormat]
    MAP_FORMAT_PNG_OVERLAY: _ClassVar[MapFormat]
METHOD_AUTO: Method
METHOD_WHITE_BOX: Method
METHOD_BLACK_BOX: Method
MAP_FORMAT_FLOAT: MapFormat
MAP_FORMAT_U8_IMAGE: MapFormat
MAP_FORMAT_PNG_HEATMAP: MapFormat
MAP_FORMAT_PNG_OVERLAY: MapFormat

class Image(_message.Message):
    __slots__ = ("encoded", "tensor", "shared_memory")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    tensor: Tensor
    shared_memory: SharedImage
    def __init__(self, encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., shared_memory: _Optional[_Union[SharedImage, _Mapping]] = ...) -> None: ...

class SharedImage(_message.Message):
    __slots__ = ("region", "offset", "byte_size", "shape")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    byte_size: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class BlackBoxOptions(_message.Message):
    __slots__ = ("num_masks", "cells", "seed")
    NUM_MASKS_FIELD_NUMBER: _ClassVar[int]
    CELLS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    num_masks: int
    cells: int
    seed: int
    def __init__(self, num_masks: _Optional[int] = ..., cells: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class GroundTruth(_message.Message):
    __slots__ = ("label", "has_label", "mask_png", "boxes")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    HAS_LABEL_FIELD_NUMBER: _ClassVar[int]
    MASK_PNG_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    label: int
    has_label: bool
    mask_png: bytes
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    def __init__(self, label: _Optional[int] = ..., has_label: _Optional[bool] = ..., mask_png: _Optional[bytes] = ..., boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x_min", "y_min", "x_max", "y_max")
    X_MIN_FIELD_NUMBER: _ClassVar[int]
    Y_MIN_FIELD_NUMBER: _ClassVar[int]
    X_MAX_FIELD_NUMBER: _ClassVar[int]
    Y_MAX_FIELD_NUMBER: _ClassVar[int]
    x_min: float
    y_min: float
    x_max: float
    y_max: float
    def __init__(self, x_min: _Optional[float] = ..., y_min: _Optional[float] = ..., x_max: _Optional[float] = ..., y_max: _Optional[float] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model_name", "model_version", "id", "image", "target_classes", "top_k", "method", "black_box", "ground_truth", "metrics", "map_format", "thresholds", "metric_options")
    class ThresholdsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLASSES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    BLACK_BOX_FIELD_NUMBER: _ClassVar[int]
    GROUND_TRUTH_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MAP_FORMAT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLDS_FIELD_NUMBER: _ClassVar[int]
    METRIC_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    id: str
    image: Image
    target_classes: _containers.RepeatedScalarFieldContainer[int]
    top_k: int
    method: Method
    black_box: BlackBoxOptions
    ground_truth: GroundTruth
    metrics: _containers.RepeatedScalarFieldContainer[str]
    map_format: MapFormat
    thresholds: _containers.ScalarMap[str, float]
    metric_options: MetricOptions
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., target_classes: _Optional[_Iterable[int]] = ..., top_k: _Optional[int] = ..., method: _Optional[_Union[Method, str]] = ..., black_box: _Optional[_Union[BlackBoxOptions, _Mapping]] = ..., ground_truth: _Optional[_Union[GroundTruth, _Mapping]] = ..., metrics: _Optional[_Iterable[str]] = ..., map_format: _Optional[_Union[MapFormat, str]] = ..., thresholds: _Optional[_Mapping[str, float]] = ..., metric_options: _Optional[_Union[MetricOptions, _Mapping]] = ...) -> None: ...

class MetricOptions(_message.Message):
    __slots__ = ("binarization", "binarization_value", "substrate", "steps", "blur_kernel", "pointing_tolerance_px")
    BINARIZATION_FIELD_NUMBER: _ClassVar[int]
    BINARIZATION_VALUE_FIELD_NUMBER: _ClassVar[int]
    SUBSTRATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    BLUR_KERNEL_FIELD_NUMBER: _ClassVar[int]
    POINTING_TOLERANCE_PX_FIELD_NUMBER: _ClassVar[int]
    binarization: str
    binarization_value: float
    substrate: str
    steps: int
    blur_kernel: int
    pointing_tolerance_px: int
    def __init__(self, binarization: _Optional[str] = ..., binarization_value: _Optional[float] = ..., substrate: _Optional[str] = ..., steps: _Optional[int] = ..., blur_kernel: _Optional[int] = ..., pointing_tolerance_px: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("class_id", "label", "score")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    label: str
    score: float
    def __init__(self, class_id: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class SaliencyMap(_message.Message):
    __slots__ = ("class_id", "label", "method", "shape", "format", "values", "data")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    label: str
    method: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    format: MapFormat
    values: _containers.RepeatedScalarFieldContainer[float]
    data: bytes
    def __init__(self, class_id: _Optional[int] = ..., label: _Optional[str] = ..., method: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., format: _Optional[_Union[MapFormat, str]] = ..., values: _Optional[_Iterable[float]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Metric(_message.Message):
    __slots__ = ("name", "value", "text", "parameters")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    text: str
    parameters: _containers.ScalarMap[str, str]
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ..., text: _Optional[str] = ..., parameters: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("id", "model_name", "model_version", "predictions", "maps", "metrics", "timings_ms")
    class TimingsMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    model_name: str
    model_version: str
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    maps: _containers.RepeatedCompositeFieldContainer[SaliencyMap]
    metrics: _containers.RepeatedCompositeFieldContainer[Metric]
    timings_ms: _containers.ScalarMap[str, float]
    def __init__(self, id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., maps: _Optional[_Iterable[_Union[SaliencyMap, _Mapping]]] = ..., metrics: _Optional[_Iterable[_Union[Metric, _Mapping]]] = ..., timings_ms: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ExplainStreamResponse(_message.Message):
    __slots__ = ("response", "id", "error_code", "error_message")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    response: ExplainResponse
    id: str
    error_code: str
    error_message: str
    def __init__(self, response: _Optional[_Union[ExplainResponse, _Mapping]] = ..., id: _Optional[str] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ("model_name", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("model_name", "model_version", "versions", "labels", "input_height", "input_width", "mean_values", "scale_values", "resize_type", "saliency_method", "saliency_target_layer", "device", "ready", "reason")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MEAN_VALUES_FIELD_NUMBER: _ClassVar[int]
    SCALE_VALUES_FIELD_NUMBER: _ClassVar[int]
    RESIZE_TYPE_FIELD_NUMBER: _ClassVar[int]
    SALIENCY_METHOD_FIELD_NUMBER: _ClassVar[int]
    SALIENCY_TARGET_LAYER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_version: str
    versions: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.RepeatedScalarFieldContainer[str]
    input_height: int
    input_width: int
    mean_values: _containers.RepeatedScalarFieldContainer[float]
    scale_values: _containers.RepeatedScalarFieldContainer[float]
    resize_type: str
    saliency_method: str
    saliency_target_layer: str
    device: str
    ready: bool
    reason: str
    def __init__(self, model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., versions: _Optional[_Iterable[str]] = ..., labels: _Optional[_Iterable[str]] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., mean_values: _Optional[_Iterable[float]] = ..., scale_values: _Optional[_Iterable[float]] = ..., resize_type: _Optional[str] = ..., saliency_method: _Optional[str] = ..., saliency_target_layer: _Optional[str] = ..., device: _Optional[str] = ..., ready: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...
