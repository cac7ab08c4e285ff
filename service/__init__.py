"""xaiserve runtime: model loading, preprocessing, serving. Never imports torch."""
