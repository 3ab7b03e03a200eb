"""Verification keypoints for rows an extractor computed before it kept them: the images are
decoded again (as ingest decodes them) and only the keypoints are written, one commit every few
seconds; no forward runs and the vectors, revision and indexes stay as they are."""

from __future__ import annotations

import os
import time

import numpy as np

from ..errors import UserError
from ..features.images import DecodedImage, SizePolicy, iter_decoded
from ..features.localset import LocalSet
from ..store import STATE_COMPUTED, STATUS_OK, StoreWriter, verify_key
from .options import IngestOptions


def verify_channels(verify) -> dict[str, int]:
    """The local set an extractor keeps for `verify` (VerifySettings or None): {key: channels}."""
    return {verify_key(verify.kind): verify.channels} if verify is not None else {}


def keypoints_or_none(pixels: np.ndarray, verify) -> LocalSet:
    """An image's verification keypoints; an image OpenCV refuses keeps none (its vectors are
    still good, so the row is not failed for it)."""
    from ..features.verifyfeat import sift_features

    try:
        return sift_features(pixels, verify)
    except UserError:  # OpenCV missing: every image would fail, say so
        raise
    except Exception:  # noqa: BLE001 - OpenCV's errors have no common type
        w, h = pixels.shape[1], pixels.shape[0]
        return LocalSet(np.zeros((0, verify.channels), np.uint8), np.zeros((0, 2), np.int16),
                        (w, h))


def rows_without_keypoints(writer: StoreWriter, extractor: str, verify) -> list[tuple[int, str]]:
    """(row, path) of the extractor's computed rows that have no keypoints yet and whose file is
    unchanged since."""
    with writer.read() as view:
        info = view.verify_set(extractor)
        if info is None:
            return []
        start, _ = view.local_spans(info)
        state = view.state(extractor)
        table = view.images()
        todo = np.flatnonzero((start < 0) & (state == STATE_COMPUTED)
                              & (table.status == STATUS_OK))
    out = []
    for r in todo:  # only files that are still what their vectors were computed from
        try:
            st = os.stat(table.path[r])
        except OSError:
            continue
        if st.st_size == int(table.size[r]) and st.st_mtime == float(table.mtime[r]):
            out.append((int(r), table.path[r]))
    return out


def backfill_verify(writer: StoreWriter, extractor: str, verify, policy: SizePolicy,
                    scales: tuple[float, ...], options: IngestOptions) -> int:
    """Find and commit the keypoints of every computed row that lacks them; returns how many
    rows got them. A file that cannot be decoded now keeps none (its row is left as it is)."""
    todo = rows_without_keypoints(writer, extractor, verify)
    if not todo:
        return 0
    key = verify_key(verify.kind)
    rows: list[int] = []
    sets: list[LocalSet] = []
    done = 0
    last = time.monotonic()
    decoded = iter_decoded([p for _, p in todo], policy, scales, workers=options.workers,
                           max_pixels=options.max_pixels, prefetch=max(32, 4 * options.workers),
                           after=lambda im: {"verify": keypoints_or_none(im.pixels[0], verify)})
    try:
        for seq, _, item in decoded:
            if isinstance(item, DecodedImage):
                rows.append(todo[seq][0])
                sets.append(item.extras["verify"])
            if rows and time.monotonic() - last >= options.commit_seconds:
                writer.add_local(extractor, key, rows, sets)
                done += len(rows)
                rows, sets, last = [], [], time.monotonic()
    finally:
        decoded.close()
        if rows:  # what is found is kept, also when interrupted
            writer.add_local(extractor, key, rows, sets)
            done += len(rows)
    return done


__all__ = ["backfill_verify", "keypoints_or_none", "rows_without_keypoints", "verify_channels"]
