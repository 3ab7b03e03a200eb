"""Files -> images -> feature maps -> pooled vectors: decoding, backbones, poolings, extraction."""
