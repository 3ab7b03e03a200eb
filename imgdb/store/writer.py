"""Writing a store: one `StoreWriter` at a time; every change is an atomic, journaled commit.

Its parts: this module opens the file, runs transactions and writes rows and vectors (their
layout in `rows`); `registry` adds models and index registrations; `journal` commits.

The writer holds the store's writer lock for its lifetime and the commit lock only inside a
`transaction` (readers go on between commits). Its HDF5 file stays open over an in-memory
`journal.Overlay` for the writer's whole life (metadata and chunk caches stay warm between
commits); a transaction ends with an HDF5 flush into the overlay and `journal.commit` puts the
changed bytes on disk all or nothing, so a kill, a full disk, a file-size limit or an I/O error
leaves the store as it was before that commit. A transaction that raises discards the HDF5
file (its memory holds the aborted changes) and the next one reopens it from the committed
bytes.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from ..errors import StoreDamaged, StoreError, UserError
from . import journal, lock
from .reader import StoreView, check_exists, damaged, hdf5_error
from .registry import STORE_WIDE_NUMBERS, RegistryWrites
from .rows import (RowPutter, RowUpdate, append_text, bump_revision, write_images, write_local,
                   write_rows)
from .schema import (FAILURE_NONE, STATE_COMPUTED, STATE_PENDING, STATUS_OK, USERBLOCK,
                     ImageTable, aligned_datasets, create_extractor, create_layout, create_local,
                     create_vectors, extractor_names, extractor_path, local_groups, now_iso,
                     VERIFY_PREFIX,
                     set_attr)

LIBVER = "latest"  # v3 superblock, checksummed object headers and chunk indexes


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        if journal.sync_enabled():
            os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_dead_leftovers(path: Path, infix: str) -> None:
    """Temporary files of killed processes (`.NAME<infix>PID`) whose process is gone."""
    prefix = f".{path.name}{infix}"
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):] if name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                (path.parent / name).unlink(missing_ok=True)
            except OSError:
                pass


def create_store(path: Path) -> None:
    """Create an empty store at `path` atomically (nothing is left if this is interrupted)."""
    _remove_dead_leftovers(path, ".creating-")
    tmp = path.with_name(f".{path.name}.creating-{os.getpid()}")
    try:
        with h5py.File(tmp, "w", libver=LIBVER, userblock_size=USERBLOCK, locking=False) as fh:
            create_layout(fh)
        fd = os.open(tmp, os.O_RDWR)
        try:
            journal.init_header(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process created it first: keep theirs
        except FileExistsError:
            pass
        except OSError:  # no hard links on this file system
            if not path.exists():
                os.replace(tmp, path)
        _fsync_dir(path)
    except OSError as exc:
        raise StoreError(f"cannot create store {path}: "
                         f"{exc.strerror or str(exc).splitlines()[0]}") from None
    finally:
        tmp.unlink(missing_ok=True)


_open_writers: "weakref.WeakSet[StoreWriter]" = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:  # before h5py's own exit hook closes files behind our back
    for writer in list(_open_writers):
        try:
            writer.close()
        except Exception:
            pass


@contextmanager
def _no_interrupt() -> Iterator[None]:
    """Hold Ctrl-C back while a commit writes (it is raised right after): a commit is never
    left half-known to the process that made it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    try:
        old = signal.signal(signal.SIGINT, lambda sig, frame: caught.append((sig, frame)))
    except (ValueError, TypeError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if caught and callable(old):
            old(*caught[0])
        elif caught and old == signal.SIG_DFL:
            raise KeyboardInterrupt


class _Completion(threading.Thread):
    """Flush a written commit to disk, then apply it in place (result: its applied header, or
    the error)."""

    def __init__(self, fd: int, written) -> None:
        super().__init__(name="imgdb-commit", daemon=False)
        self.fd, self.written = fd, written
        self.result: object = None

    def run(self) -> None:
        try:
            self.result = journal.complete(self.fd, self.written)
        except BaseException as exc:  # reported to the writer's next use
            self.result = exc


class StoreWriter(RegistryWrites):
    """The single writer of a store."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        if not create or self.path.exists():
            check_exists(self.path)
        self.created = False
        if not self.path.exists():
            if not self.path.parent.exists():
                try:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise StoreError(f"cannot create {self.path.parent}: "
                                     f"{exc.strerror or exc}") from None
            create_store(self.path)
            self.created = True
        self._fh: h5py.File | None = None
        self._overlay: journal.Overlay | None = None
        self._nodes: dict[str, object] = {}
        self._job: _Completion | None = None
        self._aligned_cache: list[h5py.Dataset] | None = None
        self._in_transaction = False
        self._broken: str | None = None
        self._dirty = False  # committed (or recovered) in this session: close() marks it clean
        self.lock = lock.WriterLock.acquire(self.path, journal.read_pid)
        try:
            try:
                # only this writer writes headers: reading it needs no lock; replaying a
                # killed writer's commit does (readers must not see it half done)
                self.header = journal.read_header(self.lock.fd, self.path)
                if not journal.plan(self.path, self.lock.fd, self.header).direct:
                    with self.lock.exclusive():
                        self.header = journal.recover(self.path, self.lock.fd)
                # a store left unfinished (a killed writer) is tidied up at close
                self._dirty = self.header.state != journal.CLEAN
                journal.write_pid(self.lock.fd, os.getpid())
            except OSError as exc:
                raise journal.os_error(self.path, exc) from None
            self._open()
        except BaseException:
            self._discard()
            self.lock.release()
            raise
        _open_writers.add(self)

    def _open(self) -> None:
        """The HDF5 file over a fresh overlay of the committed bytes."""
        self._settle()
        if self._broken is not None:
            raise StoreError(self._broken)
        self._overlay = journal.Overlay(self.lock.fd, self.header.committed,
                                        self._direct_end(self.header))
        try:
            self._fh = h5py.File(self._overlay, "r+", libver=LIBVER)
        except OSError as exc:
            self._overlay = None
            raise StoreDamaged(f"cannot open store {self.path}: {str(exc).splitlines()[0]}; "
                               f"run imgdb check --db {self.path}") from None
        StoreView(self._fh, self.path)  # validates format and version

    @staticmethod
    def _direct_end(header: journal.Header) -> int:
        """New bytes may go straight to the file up to the first journal a recovery may still
        need (the last commit's, and the one before while the last one's flush runs)."""
        end = 1 << 62
        if header.state != journal.CLEAN:
            for ref in (header.cur, header.prev):
                if ref is not None and ref.end > header.committed:
                    end = min(end, max(ref.offset, header.committed))
        return end

    def _node(self, path: str):
        """A group or dataset of the open file, looked up once per HDF5 open."""
        obj = self._nodes.get(path)
        if obj is None:
            obj = self._nodes[path] = self._fh[path]
        return obj

    def _aligned(self, fh: h5py.File) -> list[h5py.Dataset]:
        if self._aligned_cache is None:
            self._aligned_cache = list(aligned_datasets(fh))
        return self._aligned_cache

    def _discard(self) -> None:
        """Drop the HDF5 file and every uncommitted change (HDF5's close writes go nowhere)."""
        if self._overlay is not None:
            # close-time writes of new bytes stay in memory too: on a full disk they failed,
            # HDF5 kept the file open, and its exit-time close crashed the interpreter
            self._overlay.direct_end = self._overlay.base
        self._nodes.clear()
        self._aligned_cache = None
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except Exception:
                pass
        self._overlay = None

    def close(self) -> None:
        """Finish the last commit, mark the file clean and release the locks. Raises (after
        releasing) when the last commit's flush to disk failed."""
        if self.lock.fd is None:
            return
        _open_writers.discard(self)
        failed = self._job is not None
        error = None
        try:
            self._settle()
            if failed and self._broken is not None:
                error = self._broken
            self._discard()
            if self._dirty and self._broken is None:
                try:
                    with self.lock.exclusive():
                        self.header = journal.finish(self.path, self.lock.fd, self.header)
                except OSError as exc:  # consistent either way; the next writer tidies up
                    error = (f"I/O error while flushing {self.path} to disk "
                             f"({exc.strerror or exc}); what was committed can be read; run "
                             f"imgdb check --db {self.path}")
                except UserError:
                    pass
        finally:
            self.lock.release()
        if error:
            raise StoreError(error)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def discard_if_empty(self) -> None:
        """Remove a store this writer created and never filled (a failed first ingest)."""
        if not self.created:
            return
        held = self.lock.fd is not None
        other = None
        try:
            if not held:
                try:
                    other = lock.WriterLock.acquire(self.path, journal.read_pid)
                except UserError:
                    return  # someone else writes to it now: theirs
                fd = other.fd
            else:
                fd = self.lock.fd
            try:
                header = journal.read_header(fd, self.path)
                p = journal.plan(self.path, fd, header)
                view = journal.view_of(fd, p)
                fh = h5py.File(view, "r") if view is not None else \
                    h5py.File(lock.fd_path(fd, self.path), "r", locking=False)
                try:
                    v = StoreView(fh, self.path)
                    empty = v.rows == 0 and not v.extractors()
                finally:
                    fh.close()
            except (OSError, UserError):
                return
            if empty and lock.same_file(self.path, fd):
                self.path.unlink(missing_ok=True)
        finally:
            if other is not None:
                other.release()

    # -- reading and transactions ---------------------------------------------------------------
    @contextmanager
    def read(self) -> Iterator[StoreView]:
        """A view of the committed state (no lock needed: only this writer commits)."""
        if self._in_transaction:
            raise RuntimeError("StoreWriter.read() inside a transaction")
        self._usable()
        if self._fh is None:
            self._open()
        try:
            yield StoreView(self._fh, self.path)
        except Exception as exc:
            if hdf5_error(exc):
                raise damaged(self.path, exc) from None
            raise

    def _usable(self) -> None:
        if self.lock.fd is None:
            raise RuntimeError("the StoreWriter is closed")
        if self._broken is not None:
            raise StoreError(self._broken)

    def _settle(self) -> None:
        """Wait for the last commit's background flush-and-apply (see `transaction`)."""
        job, self._job = self._job, None
        if job is None:
            return
        job.join()
        if self._overlay is not None:
            self._overlay.under = {}
        if isinstance(job.result, journal.Header):
            self.header = job.result
        else:  # the commit is in the file, but this writer must stop
            self._broken = str(job.result)
            self._discard()

    @contextmanager
    def transaction(self) -> Iterator[h5py.File]:
        """Open the store for writing; on a clean exit every change is committed atomically,
        on an exception none is.

        The commit is written (journal and pending header: every later reader sees it) before
        this returns; making it durable (the fsync) and applying it in place run on a thread
        while the caller goes on (the writer reads the committed pages from memory meanwhile);
        the next transaction waits for it before it writes anything.
        """
        if self._in_transaction:
            raise RuntimeError("nested StoreWriter transactions")
        self.lock.check_no_reader()
        self._usable()
        self._in_transaction = True
        try:
            with self.lock.exclusive():
                # The last commit's flush-and-apply must finish before this commit writes: new
                # bytes go straight to the file's free space, and beside a running apply they
                # landed over the journal a recovery needs (the fault suite's file-size-limit
                # test, once an ingest's writer thread committed back to back).
                self._settle()
                self._usable()
                if self._fh is None:
                    self._open()
                fh = self._fh
                ok = False
                try:
                    yield fh
                    set_attr(fh, "modified", now_iso())
                    fh.flush()
                    self._settle()  # the previous commit first (raises if it failed)
                    self._usable()
                    ok = True
                except Exception as exc:
                    error = self._overlay.error if self._overlay is not None else None
                    if error is not None:  # HDF5 reports a failed write in its own words
                        raise journal.os_error(self.path, error) from None
                    if hdf5_error(exc):
                        raise damaged(self.path, exc) from None
                    raise
                finally:
                    if not ok:
                        self._discard()
                with _no_interrupt():
                    try:
                        written = journal.commit(self.path, self.lock.fd, self.header,
                                                 self._overlay)
                    except BaseException:
                        self._discard()
                        raise
                    if written is None:
                        return
                    self.header = written.pending
                    self._dirty = True
                    job = _Completion(self.lock.fd, written)
                    direct_end = self._direct_end(written.pending)
                    if journal.sync_enabled() and written.overlaid:
                        self._overlay.rebase(written.pending.committed,
                                             self._overlay.committed_pages(), direct_end)
                        self._job = job
                        job.start()
                    else:
                        job.run()
                        self._overlay.rebase(written.pending.committed, direct_end=direct_end)
                        if isinstance(job.result, journal.Header):
                            self.header = job.result
                        else:
                            self._broken = str(job.result)
                            self._discard()
                            raise job.result
        finally:
            self._in_transaction = False

    def images(self) -> ImageTable:
        with self.read() as view:
            return view.images()

    def state(self, extractor: str) -> np.ndarray:
        with self.read() as view:
            if extractor not in view.extractors():
                return np.zeros(view.rows, np.int8)
            return view.state(extractor)

    def settings(self, extractor: str) -> dict | None:
        with self.read() as view:
            return view.settings(extractor) if extractor in view.extractors() else None

    # -- schema ------------------------------------------------------------------------------------
    def ensure_extractor(self, extractor: str, settings: dict,
                         dims: dict[tuple[str, str], int], dtype: str = "float32",
                         local: dict[str, int] | None = None) -> bool:
        """Create the extractor's group and datasets; list-valued settings (layers, poolings,
        keep_local) are merged with what is stored. Adding a dataset to an extractor that has
        rows resets every row to pending (all its datasets must stay complete). Returns whether
        anything was added."""
        with self.transaction() as fh:
            self._aligned_cache = None  # datasets may be added
            n = int(fh.attrs["rows"])
            g = fh["descriptors"].get(extractor)
            if g is None:
                g = create_extractor(fh, extractor, settings, n)
            else:
                old = json.loads(g.attrs["settings"])
                merged = dict(old)
                for key in ("layers", "poolings", "keep_local"):
                    if key in settings or key in old:
                        merged[key] = sorted(set(old.get(key, [])) | set(settings.get(key, [])))
                if settings.get("verify") and not old.get("verify"):
                    merged["verify"] = settings["verify"]  # added; a kept kind stays as made
                set_attr(g, "settings", json.dumps(merged, sort_keys=True))
            added = False
            for (layer, pooling), dim in dims.items():
                lg = g.require_group(layer)
                if pooling not in lg:
                    create_vectors(lg, pooling, n, dim, dtype)
                    added = True
            for key, channels in (local or {}).items():
                if key not in fh.require_group("local").require_group(extractor):
                    create_local(fh, extractor, key, channels, n)
                    # verification keypoints are filled in for the computed rows on their own
                    # (ingest's backfill); conv cells need the forward again
                    added = added or not key.startswith(VERIFY_PREFIX)
            if added and n:
                state = g["state"][:n]
                state[state == STATE_COMPUTED] = STATE_PENDING
                g["state"][:n] = state
                bump_revision(g)
        return added

    # -- rows --------------------------------------------------------------------------------------
    def add_local(self, extractor: str, key: str, rows: Sequence[int], sets: Sequence) -> None:
        """Give computed rows that lack them their local features of `key` (LocalSets), as one
        commit; the vectors and the revision are untouched (indexes stay current)."""
        if not len(rows):
            return
        with self.transaction() as fh:
            node = self._node
            kg = node(f"local/{extractor}/{key}")
            ids = np.asarray(rows, np.int64)
            if ((ids < 0) | (ids >= int(fh.attrs["rows"]))).any():
                raise ValueError("add_local names rows the store does not have")
            put = RowPutter(ids)
            end = kg["features"].shape[0]
            counts = np.array([len(ls.features) for ls in sets], np.int32)
            starts = end + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            total = int(counts.sum())
            for name in ("features", "coords"):
                ds = kg[name]
                ds.resize(end + total, axis=0)
                if total:
                    write_rows(ds, end, np.concatenate([getattr(ls, name) for ls in sets]))
            put(kg["start"], starts)
            put(kg["count"], counts)
            put(kg["grid"], np.array([ls.grid for ls in sets], np.int32).reshape(-1, 2))

    def commit(self, extractor: str | None, rows: Sequence[RowUpdate],
               vectors: dict[tuple[str, str], np.ndarray] | None = None,
               file_changed: Sequence[int] = (), local: dict[str, list] | None = None
               ) -> list[int]:
        """Write a batch of rows: new ones appended, others overwritten in place.

        `vectors[(layer, pooling)]` has one row per update (ignored where the state is not
        computed). `file_changed`: existing rows whose file changed on disk, so every other
        extractor's vectors of them are outdated. `local[key]`: one LocalSet (or None) per
        update. Returns the row ids used.
        """
        if not rows:
            return []
        with self.transaction() as fh:
            node = self._node
            n = int(fh.attrs["rows"])
            ids, new_n = [], n
            for u in rows:
                if u.row is None:
                    ids.append(new_n)
                    new_n += 1
                else:
                    ids.append(u.row)
            ids_arr = np.asarray(ids, dtype=np.int64)
            if new_n > n:  # every row-aligned dataset has exactly `rows` rows
                for ds in self._aligned(fh):
                    ds.resize(new_n, axis=0)
            put = RowPutter(ids_arr)
            write_images(node, put, rows)
            changed = sorted(set(int(r) for r in file_changed))
            if extractor is not None:
                base = extractor_path(extractor)
                state = np.array([u.state for u in rows], np.int8)
                ok = state == STATE_COMPUTED
                for (layer, pooling), vec in (vectors or {}).items():
                    ds = node(f"{base}/{layer}/{pooling}")
                    vec = np.array(vec, dtype=ds.dtype)
                    vec[~ok] = np.nan
                    put(ds, vec)
                put(node(f"{base}/state"), state)
                append_text(node, base, "error", put,
                          [u.error.encode("utf-8", "replace") for u in rows])
                if local:
                    write_local(node, extractor, put, rows, ids, local, set(changed))
                bump_revision(node(base))
            if changed:  # files changed on disk: other extractors' results are outdated
                idx = np.asarray(changed, dtype=np.int64)
                for other in extractor_names(fh):
                    if other == extractor:
                        continue
                    og = node(extractor_path(other))
                    st = og["state"][idx]
                    if (st != STATE_PENDING).any():
                        og["state"][idx] = np.zeros(len(idx), np.int8)
                        bump_revision(og)
                for lg in local_groups(fh):  # their kept cells too (dead space until repair)
                    if lg.parent.name.split("/")[-1] == extractor:
                        continue
                    starts = lg["start"][idx]
                    if (starts >= 0).any():
                        lg["start"][idx] = np.full(len(idx), -1, np.int64)
                        lg["count"][idx] = np.zeros(len(idx), np.int32)
            fh.attrs["rows"] = new_n
        return ids

    def set_status(self, row_ids: Sequence[int], status: int, error: str = "") -> None:
        """Mark rows (e.g. files deleted from disk as missing) without touching descriptors."""
        if not len(row_ids):
            return
        with self.transaction() as fh:
            idx = np.array(sorted(set(int(r) for r in row_ids)), dtype=np.int64)
            put = RowPutter(idx)
            put(self._node("images/status"), np.full(len(idx), status, np.int8))
            put(self._node("images/failure"), np.full(len(idx), FAILURE_NONE, np.int8))
            append_text(self._node, "images", "error", put, [error.encode()] * len(idx))
            for ext in extractor_names(fh):
                bump_revision(fh[extractor_path(ext)])

    def write_vectors(self, extractor: str, rows: Sequence[int],
                      vectors: dict[tuple[str, str], np.ndarray]) -> None:
        """Store computed vectors of existing rows (e.g. codebook encodings) and mark them."""
        if not len(rows):
            return
        with self.transaction() as fh:
            g = fh[extractor_path(extractor)]
            put = RowPutter(np.asarray(rows, dtype=np.int64))
            for (layer, name), data in vectors.items():
                put(g[layer][name], np.asarray(data, dtype=g[layer][name].dtype))
            put(g["state"], np.full(len(rows), STATE_COMPUTED, np.int8))
            bump_revision(g)


__all__ = ["StoreWriter", "RowUpdate", "create_store", "STORE_WIDE_NUMBERS", "local_groups",
           "STATUS_OK"]

