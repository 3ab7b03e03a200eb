"""Ingest: discover -> decode -> batch -> forward + pool -> write, planned against the store.

The names below load on first use, so `from imgdb.ingest.options import IngestOptions` (the
command line's defaults) stays light.
"""

from __future__ import annotations

import importlib

_NAMES = {"run_ingest": "pipeline", "IngestOptions": "options", "IngestSummary": "plan",
          "WorkItem": "plan", "extractor_id": "plan", "plan": "plan"}

__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
