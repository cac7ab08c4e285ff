"""xaiserve runtime: model loading, preprocessing, serving. Never imports torch."""

__version__ = "0.1.0"
