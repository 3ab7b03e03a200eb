"""Benchmark protocols: ground-truth readers, the official metrics, the papers' tables."""
