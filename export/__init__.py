"""xaiserve export: sources -> OpenVINO IR with preprocessing, labels and `saliency_map`."""
