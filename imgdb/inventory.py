"""`imgdb info`: what a store holds, as a plain dict (stable keys, documented in the README):
images, extractors and their failures, descriptors, local features, models, indexes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .retrieval.index import list_indexes
from .store import (FAILURE_TRANSIENT, STATE_COMPUTED, STATE_FAILED, STATE_FAILED_TRANSIENT,
                    STATUS_FAILED, STATUS_LOST, STATUS_MISSING, STATUS_OK, open_read)


def store_report(db: str | Path) -> dict:
    """Everything `imgdb info` shows."""
    db = Path(db)
    with open_read(db) as view:
        table = view.images()
        status = table.status
        n = view.rows
        descriptors = [{"name": d.name, "rows": d.shape[0], "dim": d.shape[1], "dtype": d.dtype,
                        "computed": int((view.state(d.extractor) == STATE_COMPUTED).sum()),
                        "bytes": view.stored_bytes(d)}
                       for d in view.descriptors()]
        extractors, failed = [], []
        for e in view.extractors():
            state = view.state(e)
            bad = np.flatnonzero(np.isin(state, (STATE_FAILED, STATE_FAILED_TRANSIENT))
                                 & (status == STATUS_OK))
            extractors.append({"name": e, "settings": view.settings(e),
                               "computed": int((state == STATE_COMPUTED).sum()),
                               "failed": int(len(bad))})
            for r, err in zip(bad.tolist(), view.extractor_errors(e, bad)):
                failed.append({"id": r, "path": table.path[r], "error": err, "extractor": e,
                               "transient": bool(state[r] == STATE_FAILED_TRANSIENT)})
        for r in np.flatnonzero(status == STATUS_FAILED).tolist():
            failed.append({"id": r, "path": table.path[r], "error": table.error[r],
                           "extractor": None, "transient": bool(table.failure[r] == FAILURE_TRANSIENT)})
        failed.sort(key=lambda f: f["id"])
        indexes = list_indexes(view, db)
        return {
            "store": str(db),
            "file_bytes": view.file_bytes(),
            "format_version": int(view.attrs.get("format_version", 0)),
            "created": str(view.attrs.get("created", "")),
            "modified": str(view.attrs.get("modified", "")),
            "content_hash": view.content_hash(),
            "images": {"total": n, "ok": int((status == STATUS_OK).sum()),
                       "failed": int((status == STATUS_FAILED).sum()),
                       "missing": int((status == STATUS_MISSING).sum()),
                       "lost": int((status == STATUS_LOST).sum())},
            "extractors": extractors,
            "descriptors": descriptors,
            "local": [{"name": li.name, "kind": "keypoints" if li.verify else "cells",
                       "channels": li.channels, "images": li.images,
                       "features": li.features, "bytes": li.bytes,
                       "bytes_per_image": round(li.bytes / li.images) if li.images else 0,
                       "features_per_image": round(li.features / li.images, 1) if li.images else 0}
                      for li in view.local_sets()],
            "models": [{"name": m.id, **{k: v for k, v in m.attrs.items()
                                         if isinstance(v, (str, int, float))}}
                       for m in view.models()],
            "indexes": [{"name": i.name, "current": i.problem is None, "stale_reason": i.stale,
                         **{k: v for k, v in i.attrs.items() if isinstance(v, (str, int, float))}}
                        for i in indexes],
            "failed": failed,
        }
