"""The index files a store registers beside itself: which files an index entry names, and
whether each is still the file that was built (size and digest, with a stamp of the last full
check so later loads stay cheap). `imgdb check` and every index load use this."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..digest import file_digest
from ..errors import StoreDamaged
from .diskio import same_access
from .validate import file_name_problem


@dataclass(frozen=True)
class IndexFile:
    """One Annoy file of an index (the only one, or a shard): name, bytes, digest, items."""

    file: str
    bytes: int
    hash: str
    items: int


def index_files(attrs: dict) -> list[IndexFile]:
    """The files of a registered index, in shard order (one for an unsharded index). A name
    that is not a plain file name beside the store is damage (StoreDamaged), never a path."""
    if int(attrs.get("shards", 1)) > 1:
        files = [IndexFile(str(f), int(b), str(h), int(n)) for f, b, h, n in
                 zip(attrs["shard_files"], attrs["shard_bytes"], attrs["shard_hashes"],
                     attrs["shard_items"])]
    else:
        files = [IndexFile(str(attrs["file"]), int(attrs["file_bytes"]), str(attrs["file_hash"]),
                           int(attrs["items"]))]
    for f in files:
        problem = file_name_problem(f.file)
        if problem:
            raise StoreDamaged(f"its registry entry {problem}")
    return files


def stamp_path(path: Path) -> Path:
    """The stamp beside an index file that records its last full verification."""
    return path.with_name(path.name + ".ok")


def _file_state(st: os.stat_result) -> dict:
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def verify_file(path: Path, size: int, digest: str, full: bool = False) -> str | None:
    """None when the file is the one recorded, else what is wrong. `full` always re-digests;
    otherwise a stamp of an earlier full check is trusted while the file's state is unchanged."""
    try:
        st = path.stat()
    except OSError:
        return f"index file {path.name} is missing"
    if st.st_size != size:
        return f"index file {path.name} has {st.st_size} bytes, {size} were written"
    state = dict(_file_state(st), digest=digest)
    stamp = stamp_path(path)
    if not full:
        try:
            if json.loads(stamp.read_text()) == state:
                return None
        except (OSError, ValueError):
            pass
    if file_digest(path) != digest:
        return f"index file {path.name} does not match the digest recorded when it was built"
    _write_stamp(path, state)
    return None


def stamp_built(path: Path, digest: str) -> None:
    """Record that `path` has `digest`, just computed by the build that wrote it (so the first
    load need not read the whole file again)."""
    try:
        _write_stamp(path, dict(_file_state(path.stat()), digest=digest))
    except OSError:
        pass


def _write_stamp(path: Path, state: dict) -> None:
    stamp = stamp_path(path)
    try:
        tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}")
        tmp.write_text(json.dumps(state))
        same_access(tmp, path)  # no more readable than the index file
        os.replace(tmp, stamp)
    except OSError:
        pass  # a read-only folder: verify in full every time
