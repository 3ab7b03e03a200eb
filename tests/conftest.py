"""Shared fixtures: the CLI run in-process, and small stores built once per session.

The stores are made from scikit-image's sample photos (installed with the test extra) and
edited copies of them, so nothing outside the repository is read.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

# Exported networks (features.runtime) go to a cache of this test session, not the user's
# (subprocesses inherit it); a caller may point the suite at its own.
os.environ.setdefault("IMGDB_CACHE_DIR", tempfile.mkdtemp(prefix="imgdb-test-cache-"))

#: Sample photos of scikit-image; each gets a crop and a mirrored copy (a group of three).
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins")
#: Small and quick: EfficientNet-Lite0 with its packaged ImageNet weights, 128 px; the head's
#: local features are kept (for codebooks).
STORE_ARGS = ("--backbone", "efficientnet_lite0", "--size", "max:128", "--layers", "head",
              "--pooling", "gem-p3,mac", "--keep-local", "head", "--workers", "0", "--quiet")
DESCRIPTOR = "head/gem-p3"


@dataclass
class CliResult:
    """What one command line did: its exit code and everything it printed."""

    code: int
    stdout: str
    stderr: str

    def json(self):
        """stdout parsed as JSON."""
        return json.loads(self.stdout)


@contextlib.contextmanager
def _environ(env: dict[str, str] | None) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def invoke(*args: object, env: dict[str, str] | None = None) -> CliResult:
    """Run `imgdb ARGS` in this process through the same entry point as the script
    (imgdb.cli.run: parsing, error lines, exit codes); stdout and stderr are captured."""
    from imgdb.cli import run

    out, err = io.StringIO(), io.StringIO()
    with _environ(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run([os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args])
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def cli() -> Callable[..., CliResult]:
    """The in-process CLI runner: cli("info", "--db", path) -> CliResult(code, stdout, stderr)."""
    return invoke


@pytest.fixture(scope="session")
def cli_json(cli) -> Callable[..., object]:
    """Run a command with --json; assert it succeeded; return the parsed output."""
    def run_json(*args: object) -> object:
        result = cli(*args, "--json")
        assert result.code == 0, f"imgdb {args} exited {result.code}: {result.stderr}"
        return result.json()

    return run_json


def write_photos(folder: Path, side: int = 160) -> dict[str, list[Path]]:
    """scikit-image sample photos (longest side `side`) and, for each, a centre crop and a
    mirror image in an `edited copies` sub-folder; returns {photo: [original, crop, mirror]}."""
    import skimage.data as data
    from PIL import Image, ImageOps

    edits = folder / "edited copies"
    edits.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[Path]] = {}
    for name in PHOTOS:
        arr = getattr(data, name)()
        image = Image.fromarray(arr.astype(np.uint8) * 255 if arr.dtype == bool else arr)
        image = image.convert("RGB")
        image.thumbnail((side, side))
        w, h = image.size
        files = [folder / f"{name}.png", edits / f"{name} crop.png", edits / f"{name} mirrored.png"]
        image.save(files[0])
        image.crop((w // 8, h // 8, w - w // 8, h - h // 8)).save(files[1])
        ImageOps.mirror(image).save(files[2])
        groups[name] = files
    return groups


@pytest.fixture(scope="session")
def photo_store(tmp_path_factory, cli) -> tuple[Path, Path, dict[str, list[Path]]]:
    """A store of 6 photos x (original, crop, mirror) = 18 images: (store, photos, groups).
    Shared by the session: tests that change a store use `store_copy`."""
    root = tmp_path_factory.mktemp("photo_store")
    photos = root / "photos"
    groups = write_photos(photos)
    db = root / "photos.h5"
    result = cli("ingest", photos, "--db", db, *STORE_ARGS)
    assert result.code == 0, result.stderr
    return db, photos, groups


@pytest.fixture
def store_copy(photo_store, tmp_path: Path) -> Path:
    """A private copy of the session's photo store (safe to modify)."""
    db = tmp_path / "copy.h5"
    shutil.copy2(photo_store[0], db)
    return db
