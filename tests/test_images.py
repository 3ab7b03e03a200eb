"""Tests of imgdb.images: discovery, size policies, fault-tolerant decoding, ordered prefetch."""

from __future__ import annotations

import io
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import COIL, OXFORD_IMAGES as OXFORD
from imgdb.features.images import (
    IMAGE_EXTENSIONS,
    DecodedImage,
    Discovery,
    ImageError,
    SizePolicy,
    discover,
    iter_decoded,
    load_image,
)

ORIG = SizePolicy.parse("original")


# ---------------------------------------------------------------------------------------------
# helpers


def noise_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish random RGB image (compresses like a photo, not like pure noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(1, h // 8), max(1, w // 8), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def save(arr_or_img, path: Path, **kw) -> Path:
    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    im.save(path, **kw)
    return path


def quadrants(h: int, w: int) -> np.ndarray:
    """Asymmetric test pattern: four flat quadrants of distinct colours."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2 :] = (0, 255, 0)
    a[h // 2 :, : w // 2] = (0, 0, 255)
    a[h // 2 :, w // 2 :] = (255, 255, 0)
    return a


def quadrant_colours(a: np.ndarray) -> list[np.ndarray]:
    h, w = a.shape[:2]
    pts = [(h // 4, w // 4), (h // 4, 3 * w // 4), (3 * h // 4, w // 4), (3 * h // 4, 3 * w // 4)]
    return [a[y, x].astype(int) for y, x in pts]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose IHDR claims w x h pixels (8-bit grey); its data is a few bytes."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def check_rgb(d: DecodedImage, w: int, h: int, n: int = 1) -> np.ndarray:
    assert len(d.pixels) == n
    a = d.pixels[0]
    assert a.dtype == np.uint8 and a.shape == (h, w, 3) and a.flags.c_contiguous
    return a


# ---------------------------------------------------------------------------------------------
# SizePolicy


@pytest.mark.parametrize(
    "spec,size,expected",
    [
        ("max:512", (1024, 768), (512, 384)),
        ("max:512", (768, 1024), (384, 512)),
        ("max:1024", (300, 200), (1024, 683)),  # max:N upscales too (longest side == N)
        ("min:100", (300, 200), (150, 100)),
        ("min:800", (100, 400), (800, 3200)),
        ("fixed:586", (1024, 768), (586, 586)),
        ("fixed:640x480", (10, 1000), (640, 480)),
        ("original", (123, 45), (123, 45)),
        ("max:10", (1000, 1), (10, 1)),  # never below 1 px
    ],
)
def test_size_policy_targets(spec: str, size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert SizePolicy.parse(spec).target(*size) == expected


def test_size_policy_scales() -> None:
    assert SizePolicy.parse("max:512").target(1024, 768, scale=2.0) == (1024, 768)
    assert SizePolicy.parse("original").target(101, 51, scale=0.5) == (51, 26)  # half rounds up
    assert SizePolicy.parse("fixed:224").target(5, 7, scale=1.5) == (336, 336)
    with pytest.raises(ValueError):
        SizePolicy.parse("max:512").target(100, 100, scale=0)
    with pytest.raises(ValueError):
        SizePolicy.parse("max:512").target(0, 100)


@pytest.mark.parametrize(
    "spec,tag,canonical",
    [
        ("original", "orig", "original"),
        (" ORIGINAL ", "orig", "original"),
        ("max:1024", "max1024", "max:1024"),
        ("min:800", "min800", "min:800"),
        ("fixed:586", "fixed586", "fixed:586"),
        ("fixed:586x586", "fixed586", "fixed:586"),
        ("fixed:640x480", "fixed640x480", "fixed:640x480"),
        ("Fixed:640X480", "fixed640x480", "fixed:640x480"),
    ],
)
def test_size_policy_tag_and_spec(spec: str, tag: str, canonical: str) -> None:
    p = SizePolicy.parse(spec)
    assert p.tag == tag and p.spec == canonical and str(p) == canonical
    assert SizePolicy.parse(p.spec) == p
    hash(p)  # frozen: usable as a key


@pytest.mark.parametrize(
    "spec",
    ["", "max", "max:", "max:0", "max:-5", "max:1.5", "min:10x20", "fixed:0x5", "fixed:5x", "huge:3", "1024", "max 1024"],
)
def test_size_policy_parse_errors(spec: str) -> None:
    with pytest.raises(ValueError) as ei:
        SizePolicy.parse(spec)
    msg = str(ei.value)
    assert "\n" not in msg and "'max:N'" in msg and "'fixed:WxH'" in msg


def test_image_extensions() -> None:
    assert {".jpg", ".jpeg", ".png", ".tif", ".webp", ".jfif", ".pgm"} <= IMAGE_EXTENSIONS
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------------------------
# load_image: bad files


@pytest.fixture
def jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(noise_rgb(480, 640)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def expect_error(path: Path, fragment: str, **kw) -> str:
    with pytest.raises(ImageError) as ei:
        load_image(path, kw.pop("policy", ORIG), **kw)
    msg = str(ei.value)
    assert fragment in msg, msg
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def test_corrupt_bytes(tmp_path: Path) -> None:
    p = tmp_path / "corrupt.jpg"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    expect_error(p, "not an image")


def test_truncated_jpeg(tmp_path: Path, jpeg_bytes: bytes) -> None:
    p = tmp_path / "truncated.jpg"
    p.write_bytes(jpeg_bytes[: len(jpeg_bytes) // 2])
    expect_error(p, "truncated file")


def test_truncated_real_jpeg(tmp_path: Path) -> None:
    data = sorted(OXFORD.glob("*.jpg"))[0].read_bytes()
    p = tmp_path / "half.jpg"
    p.write_bytes(data[: len(data) // 2])
    expect_error(p, "truncated file", policy=SizePolicy.parse("max:1024"))


def test_truncated_png(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(noise_rgb(200, 300)).save(buf, format="PNG")
    p = tmp_path / "truncated.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expect_error(p, "truncated file")


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    expect_error(p, "empty file (0 bytes)")


def test_text_named_png(tmp_path: Path) -> None:
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n" * 20)
    expect_error(p, "not an image (cannot identify image file)")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.jpg", "cannot read file")
    expect_error(tmp_path, "not a regular file")


def test_decompression_bomb_header(tmp_path: Path) -> None:
    p = tmp_path / "bomb.png"
    p.write_bytes(bomb_png(100_000, 100_000))
    assert p.stat().st_size < 200
    t = time.perf_counter()
    msg = expect_error(p, "image too large")
    assert time.perf_counter() - t < 1.0  # rejected from the header, nothing decoded
    assert "100,000" in msg or "10,000,000,000" in msg


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_below_pillow_limit_uses_our_limit(tmp_path: Path) -> None:
    p = tmp_path / "bomb.png"
    p.write_bytes(bomb_png(12_000, 11_000))  # 132 M pixels: above our default 120 M, below Pillow's error
    expect_error(p, "image too large: 12000x11000 pixels exceeds the limit of 120,000,000")


def test_max_pixels_low(tmp_path: Path) -> None:
    p = save(noise_rgb(100, 200), tmp_path / "modest.png")
    expect_error(p, "image too large: 200x100 pixels exceeds the limit of 10,000", max_pixels=10_000)
    check_rgb(load_image(p, ORIG, max_pixels=20_000), 200, 100)


def test_tiny_image(tmp_path: Path) -> None:
    p = save(noise_rgb(10, 10), tmp_path / "tiny.png")
    expect_error(p, "image too small: 10x10, needs at least 32 px per side")
    check_rgb(load_image(p, ORIG, min_side=8), 10, 10)
    # a thumbnail is not upscaled into an acceptable image
    expect_error(p, "image too small: 10x10,", policy=SizePolicy.parse("max:1024"))
    # too small after resizing: a long thin strip under max:64 -> 64x5
    q = save(noise_rgb(40, 512), tmp_path / "strip.png")
    expect_error(q, "image too small: 64x5 after resizing", policy=SizePolicy.parse("max:64"))


# ---------------------------------------------------------------------------------------------
# load_image: good but unusual files


def test_jpeg_metadata_and_draft(tmp_path: Path, jpeg_bytes: bytes) -> None:
    import hashlib

    p = tmp_path / "photo.jpg"
    p.write_bytes(jpeg_bytes)
    d = load_image(p, SizePolicy.parse("max:160"), scales=(1.0, 2.0, 0.5))
    assert (d.width, d.height) == (640, 480)
    assert [a.shape for a in d.pixels] == [(120, 160, 3), (240, 320, 3), (60, 80, 3)]
    assert d.file_size == len(jpeg_bytes)
    assert d.sha == hashlib.blake2b(jpeg_bytes, digest_size=16).hexdigest()
    assert d.mtime == pytest.approx(p.stat().st_mtime)
    # the reduced-size (draft) decode stays close to a full decode + resize
    full = Image.open(io.BytesIO(jpeg_bytes)).convert("RGB").resize((160, 120), Image.Resampling.BICUBIC)
    diff = np.abs(d.pixels[0].astype(int) - np.asarray(full).astype(int))
    assert diff.mean() < 4


def test_grayscale_l(tmp_path: Path) -> None:
    g = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (40, 1))  # 64 x 40
    p = save(g, tmp_path / "gray.png")
    a = check_rgb(load_image(p, ORIG), 64, 40)
    assert (a[..., 0] == g).all() and (a[..., 1] == g).all() and (a[..., 2] == g).all()


def test_one_bit(tmp_path: Path) -> None:
    im = Image.new("1", (40, 40), 0)
    im.paste(1, (0, 0, 20, 40))
    a = check_rgb(load_image(save(im, tmp_path / "bits.png"), ORIG), 40, 40)
    assert (a[:, :20] == 255).all() and (a[:, 20:] == 0).all()


def test_cmyk_jpeg(tmp_path: Path) -> None:
    im = Image.new("CMYK", (64, 48), (0, 255, 255, 0))  # pure red in CMYK
    p = save(im, tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(p).mode == "CMYK"
    a = check_rgb(load_image(p, ORIG), 64, 48)
    r, g, b = a.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 50 and b < 50


def test_sixteen_bit_png(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 256).astype(np.uint16)
    arr = np.tile(ramp, (40, 1))  # 256 x 40 horizontal gradient, full 16-bit range
    p = save(arr, tmp_path / "deep.png")
    assert Image.open(p).mode.startswith("I")
    a = check_rgb(load_image(p, ORIG), 256, 40)
    row = a[20, :, 0].astype(int)
    assert (np.diff(row) >= 0).all()  # monotonic
    assert row[0] == 0 and row[-1] == 255
    assert (row == 255).sum() <= 2 and 100 < row.mean() < 155  # not saturated
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()


def test_twelve_bit_data_in_sixteen_bit_png(tmp_path: Path) -> None:
    arr = np.tile(np.linspace(0, 4095, 128).astype(np.uint16), (40, 1))
    a = check_rgb(load_image(save(arr, tmp_path / "twelve.png"), ORIG), 128, 40)
    row = a[0, :, 0].astype(int)
    assert (np.diff(row) >= 0).all() and row[-1] == 255 and row[0] == 0  # stretched by its range


def test_32bit_int_and_float_tiff(tmp_path: Path) -> None:
    ints = np.tile(np.linspace(-1000, 3_000_000, 64).astype(np.int32), (40, 1))
    a = check_rgb(load_image(save(Image.fromarray(ints), tmp_path / "i32.tif"), ORIG), 64, 40)
    assert (np.diff(a[0, :, 0].astype(int)) >= 0).all() and a[0, 0, 0] == 0 and a[0, -1, 0] == 255
    floats = np.tile(np.linspace(0.0, 1.0, 64).astype(np.float32), (40, 1))
    floats[0, 0] = np.nan
    b = check_rgb(load_image(save(Image.fromarray(floats), tmp_path / "f32.tif"), ORIG), 64, 40)
    assert b[1, -1, 0] == 255 and b[1, 0, 0] == 0 and abs(int(b[1, 32, 0]) - 130) <= 2


def test_palette_with_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (60, 40), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black, index 1 red
    im.paste(1, (30, 0, 60, 40))
    p = save(im, tmp_path / "pal.png", transparency=0)
    a = check_rgb(load_image(p, ORIG), 60, 40)
    assert (a[:, :30] == 255).all()  # transparent black -> white, not black
    assert (a[:, 30:] == (255, 0, 0)).all()


def test_palette_gif_transparency_and_animation(tmp_path: Path) -> None:
    frames = []
    for colour in [(255, 0, 0), (0, 0, 255)]:
        f = Image.new("RGB", (48, 48), colour)
        frames.append(f)
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    a = check_rgb(load_image(p, ORIG), 48, 48)
    r, g, b = a.reshape(-1, 3).mean(axis=0)
    assert r > 200 and b < 50  # first frame


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((40, 60, 4), np.uint8)
    arr[:, :20] = (0, 0, 0, 0)  # fully transparent black -> white
    arr[:, 20:40] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    arr[:, 40:] = (0, 128, 255, 255)  # opaque
    a = check_rgb(load_image(save(arr, tmp_path / "alpha.png"), ORIG), 60, 40)
    assert (a[:, :20] == 255).all()
    assert np.abs(a[:, 20:40].astype(int) - 127).max() <= 2
    assert (a[:, 40:] == (0, 128, 255)).all()


def test_la_mode(tmp_path: Path) -> None:
    arr = np.zeros((40, 40, 2), np.uint8)
    arr[..., 0] = 0
    arr[:, 20:, 1] = 255
    a = check_rgb(load_image(save(Image.fromarray(arr, "LA"), tmp_path / "la.png"), ORIG), 40, 40)
    assert (a[:, :20] == 255).all() and (a[:, 20:] == 0).all()


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_exif_orientation_6(tmp_path: Path, fmt: str) -> None:
    src = quadrants(100, 200)  # stored 200 wide x 100 high
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    p = save(src, tmp_path / f"rot.{fmt}", exif=exif.tobytes(), **({"quality": 95} if fmt == "jpg" else {}))
    d = load_image(p, ORIG)
    assert (d.width, d.height) == (100, 200)  # swapped
    a = check_rgb(d, 100, 200)
    expected = np.rot90(src, k=-1)  # manual clockwise rotation
    for got, want in zip(quadrant_colours(a), quadrant_colours(expected)):
        assert np.abs(got - want).max() <= 8, (got, want)
    if fmt == "png":
        assert (a == expected).all()
    # under a policy the target is computed on the oriented size, and JPEG draft keeps it exact
    d2 = load_image(p, SizePolicy.parse("max:64"))
    assert d2.pixels[0].shape == (64, 32, 3)


@pytest.mark.parametrize("name", ["with space.jpg", "café ü 東京.jpg", "UPPER.JPEG", "semi;colon 'q'.png"])
def test_odd_file_names(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    fmt = "PNG" if name.endswith(".png") else "JPEG"
    save(noise_rgb(60, 80), p, format=fmt)
    check_rgb(load_image(p, ORIG), 80, 60)
    assert discover([tmp_path]).files == [p]


# ---------------------------------------------------------------------------------------------
# discover


def touch_image(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_discover_recursive_sorted(tmp_path: Path) -> None:
    root = tmp_path / "root"
    files = [
        root / "b.jpg",
        root / "a.PNG",
        root / "sub" / "z.jpeg",
        root / "sub" / "deeper" / "c.tif",
        root / "a2" / "x.webp",
    ]
    for f in files:
        touch_image(f)
    touch_image(root / "notes.txt")
    touch_image(root / ".hidden.jpg")
    touch_image(root / ".cache" / "thumb.jpg")
    touch_image(root / "sub" / "README")
    res = discover([root])
    assert isinstance(res, Discovery) and res.problems == []
    assert res.files == sorted(files, key=str)
    assert all(f.is_absolute() for f in res.files)
    assert discover([str(root)]).files == res.files  # deterministic, str accepted


def test_discover_explicit_file_order_and_dedup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "d"
    a = touch_image(d / "a.jpg")
    b = touch_image(d / "b.jpg")
    odd = touch_image(tmp_path / "photo.raw")  # non-image extension, named explicitly: kept
    hidden = touch_image(tmp_path / ".secret.jpg")  # hidden, named explicitly: kept
    monkeypatch.chdir(tmp_path)
    res = discover([Path("photo.raw"), d, b, ".secret.jpg", "d/../d/a.jpg"])
    assert res.files == [odd, a, b, hidden]
    assert res.problems == []


def test_discover_missing_and_broken_link(tmp_path: Path) -> None:
    touch_image(tmp_path / "ok.jpg")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    res = discover([tmp_path / "missing_dir", tmp_path])
    assert res.files == [tmp_path / "ok.jpg"]
    reasons = dict(res.problems)
    assert "no such file" in reasons[tmp_path / "missing_dir"]
    assert "broken symbolic link" in reasons[tmp_path / "dangling.jpg"]
    assert all("\n" not in r for r in reasons.values())


def test_discover_symlink_loop_terminates(tmp_path: Path) -> None:
    root = tmp_path / "root"
    img = touch_image(root / "sub" / "a.jpg")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # sub/loop -> its grandparent
    (root / "sub" / "self").symlink_to(root / "sub", target_is_directory=True)
    linked = tmp_path / "elsewhere"
    other = touch_image(linked / "b.jpg")
    (root / "link_out").symlink_to(linked, target_is_directory=True)  # followed
    res = discover([root])
    assert res.files == [root / "link_out" / "b.jpg", img]
    assert other.exists()
    loops = [p for p, r in res.problems if "loop" in r]
    assert set(loops) == {root / "sub" / "loop", root / "sub" / "self"}


def test_discover_dedups_same_file_via_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    touch_image(real / "a.jpg")
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    res = discover([real, tmp_path / "alias", tmp_path])
    assert res.files == [real / "a.jpg"] and res.problems == []


def test_discover_unreadable_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    touch_image(locked / "a.jpg")
    touch_image(tmp_path / "b.jpg")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running with privileges that read a chmod 000 directory (root)")
        res = discover([tmp_path])
        assert res.files == [tmp_path / "b.jpg"]
        assert [p for p, _ in res.problems] == [locked]
        assert "cannot read directory" in res.problems[0][1]
    finally:
        locked.chmod(0o755)


def test_discover_unreadable_directory_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same as above, but works as root too: listing the directory fails with EACCES."""
    import imgdb.features.images as images_mod

    locked = tmp_path / "locked"
    touch_image(locked / "a.jpg")
    touch_image(tmp_path / "b.jpg")
    real_scandir = os.scandir

    def fake_scandir(path):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(images_mod.os, "scandir", fake_scandir)
    res = discover([tmp_path])
    assert res.files == [tmp_path / "b.jpg"]
    assert res.problems == [(locked, "cannot read directory (permission denied)")]


# ---------------------------------------------------------------------------------------------
# iter_decoded


@pytest.fixture
def mixed_files(tmp_path: Path) -> tuple[list[Path], set[int]]:
    paths, bad = [], set()
    for i in range(24):
        if i % 5 == 3:
            p = tmp_path / f"{i:02d}_bad.jpg"
            p.write_bytes(b"not a jpeg at all" * 3)
            bad.add(i)
        else:
            p = save(noise_rgb(40 + i, 50 + 2 * i, seed=i), tmp_path / f"{i:02d}.png")
        paths.append(p)
    return paths, bad


@pytest.mark.parametrize("workers", [0, 1, 4])
def test_iter_decoded_order_and_errors(mixed_files, workers: int) -> None:
    paths, bad = mixed_files
    out = list(iter_decoded(paths, ORIG, workers=workers, prefetch=3))
    assert [i for i, _, _ in out] == list(range(len(paths)))
    assert [p for _, p, _ in out] == paths
    for i, _, r in out:
        if i in bad:
            assert isinstance(r, ImageError) and "not an image" in str(r)
            assert r.__traceback__ is None  # no frames (and file bytes) kept alive
        else:
            assert isinstance(r, DecodedImage)
            assert r.pixels[0].shape == (40 + i, 50 + 2 * i, 3)


@pytest.mark.parametrize("workers", [0, 3])
def test_iter_decoded_after_runs_in_the_workers(mixed_files, workers: int) -> None:
    paths, bad = mixed_files
    main = threading.current_thread()

    def after(image: DecodedImage) -> dict:
        if image.pixels[0].shape[0] == 41:  # one readable file whose extra work fails
            raise ValueError("cannot do it\nsecond line")
        return {"h": image.pixels[0].shape[0], "thread": threading.current_thread()}

    out = list(iter_decoded(paths, ORIG, workers=workers, prefetch=3, after=after))
    for i, _, r in out:
        if i == 1:
            assert isinstance(r, ImageError) and str(r) == "ValueError: cannot do it"
        elif i not in bad:
            assert r.extras["h"] == 40 + i
            assert (r.extras["thread"] is main) == (workers == 0)


def test_iter_decoded_bounded_in_flight(mixed_files) -> None:
    paths, _ = mixed_files
    pulled = 0

    def source():
        nonlocal pulled
        for p in paths:
            pulled += 1
            yield p

    gen = iter_decoded(source(), ORIG, workers=2, prefetch=4)
    next(gen)
    assert pulled <= 5  # the window, not the whole input
    gen.close()


def _decode_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("imgdb-decode")}


def test_iter_decoded_early_close(tmp_path: Path) -> None:
    p = save(noise_rgb(300, 400), tmp_path / "one.png")
    paths = [p] * 300
    before = _decode_threads()  # threads other tests may still hold; only ours must be gone
    t = time.perf_counter()
    gen = iter_decoded(paths, SizePolicy.parse("max:64"), workers=4, prefetch=16)
    first = [next(gen) for _ in range(3)]
    gen.close()
    assert time.perf_counter() - t < 5
    assert [i for i, _, _ in first] == [0, 1, 2]
    assert _decode_threads() <= before
    # closing a generator that never started is fine too
    iter_decoded(paths, ORIG).close()
    # breaking out of a for loop (garbage collection of the generator) also shuts down
    for i, _, _ in iter_decoded(paths, ORIG, workers=3):
        if i == 1:
            break
    import gc

    gc.collect()
    assert _decode_threads() <= before


def test_iter_decoded_empty_and_bad_scales() -> None:
    assert list(iter_decoded([], ORIG, workers=4)) == []
    with pytest.raises(ValueError):
        next(iter_decoded(["x.jpg"], ORIG, scales=(1.0, 0.0)))


# ---------------------------------------------------------------------------------------------
# real photos


def test_real_oxford_photos() -> None:
    files = discover([OXFORD]).files
    assert files and files == sorted(files, key=str)
    pol = SizePolicy.parse("max:1024")
    for i, p, r in iter_decoded(files[:10], pol, scales=(1.0, 0.5), workers=4):
        assert isinstance(r, DecodedImage), (p, r)
        a, half = r.pixels
        assert max(a.shape[:2]) == 1024 and a.shape[2] == 3 and a.dtype == np.uint8
        assert (a.shape[1], a.shape[0]) == pol.target(r.width, r.height)
        assert max(half.shape[:2]) == 512
        assert a.std() > 10  # a photo, not a flat frame


def test_real_coil_grayscale() -> None:
    files = discover([COIL]).files[:20]
    assert files
    for _, p, r in iter_decoded(files, SizePolicy.parse("fixed:224"), workers=2):
        assert isinstance(r, DecodedImage), (p, r)
        a = r.pixels[0]
        assert a.shape == (224, 224, 3)
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
