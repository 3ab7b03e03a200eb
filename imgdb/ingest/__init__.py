"""Ingest: discover -> decode -> batch -> forward + pool -> write, planned against the store."""

from .pipeline import run_ingest
from .plan import IngestOptions, IngestSummary, WorkItem, extractor_id, plan

__all__ = ["run_ingest", "IngestOptions", "IngestSummary", "WorkItem", "extractor_id", "plan"]
