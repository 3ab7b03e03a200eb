"""Shared test helpers: where the test data lives (tests/data), running the CLI, bad files."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

DATA = Path(__file__).resolve().parent / "data"  # real photos and ground truth: see data/README.md
OXFORD_GT = DATA / "oxford5k" / "gt_files_170407"
OXFORD_IMAGES = DATA / "oxford5k" / "images"
OXFORD_CROPS = DATA / "oxford5k" / "query_crops"
COIL = DATA / "coil20" / "images"


def run_cli(*args: str, check: bool | None = True, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `imgdb ARGS` as a user would, through the script's own entry point (imgdb.cli.run:
    parsing, one-line errors, exit codes) but in this process, which saves an interpreter and
    torch start per command; `timeout` is not enforced. Tests of process behaviour (kill -9,
    Ctrl-C, what is imported) start `python -m imgdb` themselves."""
    from conftest import invoke

    result = invoke(*args, env=env)
    proc = subprocess.CompletedProcess(["imgdb", *map(str, args)], result.code, result.stdout,
                                       result.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"imgdb {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def png_header_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def make_bad_files(folder: Path, good_photo: Path) -> dict[str, bool]:
    """Write every kind of awkward input into `folder`; returns {file name: should succeed}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photo = Image.open(good_photo).convert("RGB")
    photo.thumbnail((320, 320))
    arr = np.asarray(photo)
    out: dict[str, bool] = {}

    def put(name: str, ok: bool, data: bytes | None = None, image: Image.Image | None = None,
            **save_kw) -> None:
        path = folder / name
        if image is not None:
            image.save(path, **save_kw)
        else:
            path.write_bytes(data or b"")
        out[name] = ok

    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    jpeg = buf.getvalue()
    put("corrupt.jpg", False, bytes(rng.integers(0, 256, 4000, dtype=np.uint8)))
    put("truncated.jpg", False, jpeg[: len(jpeg) // 2])
    put("empty.jpg", False, b"")
    put("notes.png", False, b"this is a text file, not a picture\n" * 20)
    put("bomb.png", False, png_header_bomb(100_000, 100_000))
    put("tiny.png", False, image=Image.fromarray(arr[:12, :12]))
    put("grey scale.png", True, image=photo.convert("L"))
    put("cmyk.jpg", True, image=photo.convert("CMYK"), format="JPEG")
    sixteen = (np.asarray(photo.convert("L")).astype(np.uint16) * 257)
    put("sixteen-bit.png", True, image=Image.fromarray(sixteen))
    put("palette alpha.png", True, image=photo.convert("RGBA").convert("P"), transparency=0)
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    put("alpha.png", True, image=rgba)
    exif = Image.Exif()
    exif[0x0112] = 6
    put("rotated.jpg", True, image=photo, format="JPEG", exif=exif.tobytes())
    put("café ü 東京.jpg", True, data=jpeg)
    return out


def chromium_or_skip() -> str:
    """The headless browser's path. Without one the test is skipped, except under
    IMGDB_REQUIRE_BROWSER=1 (CI's setting), where it fails."""
    import shutil

    import pytest

    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    message = "no headless browser installed (apt-get install chromium)"
    if os.environ.get("IMGDB_REQUIRE_BROWSER") == "1":
        pytest.fail(message + "; IMGDB_REQUIRE_BROWSER=1 requires one")
    pytest.skip(message)
