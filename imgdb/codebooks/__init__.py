"""Codebook methods on stored local features: masks, embeddings, aggregation, fit and encode."""
