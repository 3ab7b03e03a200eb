"""The one file digest used everywhere: blake2b-128 hex, the same as `/images/sha`."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: str | Path) -> str:
    """Digest of a file's bytes, read in chunks (weights files and indexes can be large)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
