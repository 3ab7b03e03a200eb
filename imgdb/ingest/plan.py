"""What an ingest run will do: its options, the work list planned against the store, its summary.

A known file is unchanged when its size and mtime match the store. Failures are retried by
kind: a transient one (permissions, memory, I/O) on every rerun, a permanent one (the bytes are
not a usable image) only when the file changed or `--retry-failed` asks; a failure under one
extractor never stops another extractor from computing the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .options import IngestOptions
from ..store import (FAILURE_TRANSIENT, STATE_COMPUTED, STATE_FAILED, STATE_FAILED_TRANSIENT,
                     STATE_PENDING, STATUS_FAILED, STATUS_MISSING, STATUS_OK, ImageTable)


@dataclass
class IngestSummary:
    """What a run did; printed as the closing line and available as JSON."""

    store: str
    extractor: str
    discovered: int = 0
    new: int = 0
    changed: int = 0
    recomputed: int = 0
    retried: int = 0
    unchanged: int = 0
    ok: int = 0
    failed: int = 0
    missing: int = 0
    seconds: float = 0.0
    keypoints_added: int = 0  # earlier rows given verification keypoints (no forward)
    failures: list[tuple[str, str]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    engine: dict = field(default_factory=dict)  # what a distributed engine did (--engine ray)

    @property
    def processed(self) -> int:
        return self.ok + self.failed

    def count(self, work: Sequence["WorkItem"]) -> None:
        self.new = sum(w.reason == "new" for w in work)
        self.changed = sum(w.reason == "changed" for w in work)
        self.recomputed = sum(w.reason == "compute" for w in work)
        self.retried = sum(w.reason == "retry" for w in work)

    def line(self) -> str:
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        parts = [f"{self.discovered} files found", f"{self.new} new", f"{self.changed} changed"]
        if self.recomputed:
            parts.append(f"{self.recomputed} computed for this extractor")
        if self.retried:
            parts.append(f"{self.retried} failed before, retried")
        parts.append(f"{self.unchanged} unchanged")
        if self.keypoints_added:
            parts.append(f"{self.keypoints_added} given verification keypoints")
        done = f"{self.ok} ingested, {self.failed} failed"
        if self.missing:
            done += f", {self.missing} marked missing"
        return (f"{', '.join(parts)}; {done} in {self.seconds:.1f}s ({rate:.1f} images/s) "
                f"-> {self.store} [{self.extractor}]")


@dataclass(frozen=True)
class WorkItem:
    """One file to (re)process: `row` is its store row, or None for a new image."""

    path: Path
    row: int | None
    reason: str  # new | changed | compute | retry


def plan(table: ImageTable, state: np.ndarray, files: Sequence[Path], roots: Sequence[Path],
         retry_failed: bool = False) -> tuple[list[WorkItem], list[int], int]:
    """Decide what to do: (work in discovery order, rows to mark missing, unchanged count)."""
    rows = table.row_of()
    work: list[WorkItem] = []
    unchanged = 0
    seen: set[str] = set()
    for path in files:
        key = str(path)
        seen.add(key)
        r = rows.get(key)
        if r is None:
            work.append(WorkItem(path, None, "new"))
            continue
        try:
            st = path.stat()
        except OSError:
            work.append(WorkItem(path, r, "changed"))  # vanished since discovery: record why
            continue
        same = (int(table.size[r]) == st.st_size and float(table.mtime[r]) == st.st_mtime
                and table.status[r] != STATUS_MISSING)
        if not same:
            work.append(WorkItem(path, r, "changed"))
        elif table.status[r] == STATUS_FAILED:
            if retry_failed or table.failure[r] == FAILURE_TRANSIENT:
                work.append(WorkItem(path, r, "retry"))
            else:
                unchanged += 1
        elif state[r] == STATE_PENDING:
            work.append(WorkItem(path, r, "compute"))
        elif state[r] == STATE_FAILED_TRANSIENT or (retry_failed and state[r] == STATE_FAILED):
            work.append(WorkItem(path, r, "retry"))
        else:
            unchanged += 1
    missing = _missing_rows(table, seen, roots)
    return work, missing, unchanged


def _missing_rows(table: ImageTable, seen: set[str], roots: Sequence[Path]) -> list[int]:
    """Rows under the given roots whose file no longer exists."""
    root_dirs = [str(p) + os.sep for p in roots if p.is_dir()]
    root_files = {str(p) for p in roots}
    return [r for r, p in enumerate(table.path)
            if p and p not in seen and table.status[r] != STATUS_MISSING
            and (p in root_files or any(p.startswith(d) for d in root_dirs))
            and not os.path.lexists(p)]


def extractor_id(backbone: str, weights_tag: str, size_tag: str, scales: Iterable[float],
                 buckets: int = 0, decode: str = "cpu") -> str:
    """`<backbone>-<weights>-<size>[-s<scales>][-pad<N>][-gpudec]`, e.g.
    `vgg16-imagenet-max1024`: settings that change the vectors are part of the name."""
    scales = list(scales)
    name = f"{backbone}-{weights_tag}-{size_tag}"
    if scales != [1.0]:
        name += "-s" + "+".join(f"{s:g}" for s in scales)
    if buckets:
        name += f"-pad{buckets}"
    if decode == "gpu":
        name += "-gpudec"
    return name


__all__ = ["IngestOptions", "IngestSummary", "WorkItem", "plan", "extractor_id", "STATUS_OK",
           "STATE_COMPUTED"]
