"""Stored vectors -> answers: PCA-whitening, indexes, query description and search."""
