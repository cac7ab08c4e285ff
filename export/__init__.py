"""xaiserve export: sources -> OpenVINO IR with preprocessing, labels and `saliency_map`."""

# Source loaders in modules of their own register with export.sources when imported (as timm's
# model modules register theirs).
from . import huggingface  # noqa: F401,E402
