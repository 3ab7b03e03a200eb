"""Image files in, RGB uint8 arrays out: discovery, safe decoding, size policies, threaded prefetch.

This is the first stage of the pipeline (files -> images). Every failure of a single file is
turned into an :class:`ImageError` with a one-line human reason, so callers can record it and
carry on; nothing here imports torch.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import re
import stat
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from ..errors import UserError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DEFAULT_MAX_PIXELS",
    "load_query_image",
    "decode_query_bytes",
    "upright_size",
    "DEFAULT_MIN_SIDE",
    "Discovery",
    "discover",
    "SizePolicy",
    "ImageError",
    "DecodedImage",
    "load_image",
    "iter_decoded",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
        ".ppm", ".pgm", ".pbm",
    }
)

DEFAULT_MAX_PIXELS: int = 120_000_000
DEFAULT_MIN_SIDE: int = 32

# We enforce our own pixel limit (max_pixels) from the header before decoding, so Pillow's
# warning between its MAX_IMAGE_PIXELS and 2x that would only be noise on stderr for images we
# accepted on purpose. Pillow's DecompressionBombError (above 2x) is still turned into an
# ImageError below.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Formats Image.open may try: the common photo/raster formats only. Exotic parsers are attack
# surface for no gain here, and EPS is left out on purpose (loading it runs Ghostscript).
_ALLOWED_FORMATS = (
    "JPEG", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "ICO", "PCX", "SGI",
    "QOI", "JPEG2000", "AVIF",
)


_PLUGINS = ("JpegImagePlugin", "PngImagePlugin", "GifImagePlugin", "BmpImagePlugin",
            "TiffImagePlugin", "WebPImagePlugin", "PpmImagePlugin", "IcoImagePlugin",
            "PcxImagePlugin", "SgiImagePlugin", "QoiImagePlugin", "Jpeg2KImagePlugin",
            "AvifImagePlugin")


@functools.lru_cache(maxsize=1)
def open_formats() -> tuple[str, ...]:
    """The allowed formats this Pillow build can read. Only their plugins are imported (each
    registers itself): Image.init() would import all forty, a cost every cold query pays."""
    import importlib

    for name in _PLUGINS:
        try:
            importlib.import_module(f"PIL.{name}")
        except ImportError:  # not in this Pillow build
            pass
    return tuple(f for f in _ALLOWED_FORMATS if f in Image.OPEN)


# ---------------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------------


@dataclass
class Discovery:
    """Image files found under some paths, plus the entries that could not be walked."""

    files: list[Path] = field(default_factory=list)
    problems: list[tuple[Path, str]] = field(default_factory=list)


def os_error_reason(err: OSError) -> str:
    """One-line lowercase reason from an OSError (its strerror, without the path)."""
    text = err.strerror or str(err) or type(err).__name__
    return text.splitlines()[0].lower() if text else type(err).__name__


def discover(paths: Sequence[str | Path] | str | Path) -> Discovery:
    """Find image files under files/directories (recursive, follows dir symlinks, loop-safe, never raises)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out = Discovery()
    seen_files: set[tuple[int, int]] = set()
    visited_dirs: set[tuple[int, int]] = set()

    def add_file(p: Path, st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key not in seen_files:
            seen_files.add(key)
            out.files.append(p)

    for raw in paths:
        top = Path(os.path.abspath(os.fspath(raw)))
        try:
            st = os.stat(top)
        except FileNotFoundError:
            if os.path.islink(top):
                out.problems.append((top, "broken symbolic link"))
            else:
                out.problems.append((top, "no such file or directory"))
            continue
        except OSError as e:
            out.problems.append((top, f"cannot access ({os_error_reason(e)})"))
            continue
        if stat.S_ISREG(st.st_mode):
            add_file(top, st)  # named explicitly: kept whatever its extension
            continue
        if not stat.S_ISDIR(st.st_mode):
            out.problems.append((top, "not a regular file or directory"))
            continue

        found: list[tuple[Path, os.stat_result]] = []
        # Explicit stack (no recursion limit); each entry carries its ancestors for loop detection.
        stack: list[tuple[Path, tuple[tuple[int, int], ...]]] = []
        key = (st.st_dev, st.st_ino)
        if key not in visited_dirs:
            visited_dirs.add(key)
            stack.append((top, (key,)))
        while stack:
            d, ancestors = stack.pop()
            try:
                with os.scandir(d) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as e:
                out.problems.append((d, f"cannot read directory ({os_error_reason(e)})"))
                continue
            subdirs: list[tuple[Path, tuple[tuple[int, int], ...]]] = []
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                p = d / entry.name
                try:
                    est = os.stat(entry.path)  # follows symlinks
                except FileNotFoundError:
                    if entry.is_symlink():
                        out.problems.append((p, "broken symbolic link"))
                    continue
                except OSError as e:
                    out.problems.append((p, f"cannot access ({os_error_reason(e)})"))
                    continue
                if stat.S_ISDIR(est.st_mode):
                    dkey = (est.st_dev, est.st_ino)
                    if dkey in ancestors:
                        out.problems.append((p, "symlink loop (points to one of its parent directories), skipped"))
                        continue
                    if dkey in visited_dirs:
                        continue  # same directory reached another way: already walked
                    visited_dirs.add(dkey)
                    subdirs.append((p, ancestors + (dkey,)))
                elif stat.S_ISREG(est.st_mode):
                    if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                        found.append((p, est))
            stack.extend(reversed(subdirs))
        found.sort(key=lambda t: str(t[0]))
        for p, fst in found:
            add_file(p, fst)
    return out


# ---------------------------------------------------------------------------------------------
# Size policy
# ---------------------------------------------------------------------------------------------

_POLICY_FORMS = "expected 'original', 'max:N', 'min:N', 'fixed:N' or 'fixed:WxH' with N, W, H positive integers"
_POLICY_RE = re.compile(r"^(max|min|fixed):(\d+)(?:[xX](\d+))?$")
_POLICY_KINDS = ("original", "max", "min", "fixed")
_MAX_POLICY_SIDE = 1_000_000


def _round(x: float) -> int:
    """Round half up to an int, at least 1 (Python's round() is banker's rounding)."""
    return max(1, int(math.floor(x + 0.5)))


@dataclass(frozen=True)
class SizePolicy:
    """How images are resized before the network: original, longest side, shortest side, or fixed."""

    kind: str = "original"
    width: int = 0  # N for max/min, W for fixed, 0 for original
    height: int = 0  # N for max/min, H for fixed, 0 for original

    def __post_init__(self) -> None:
        """Validate the fields so a policy object is always usable."""
        if self.kind not in _POLICY_KINDS:
            raise ValueError(f"invalid size policy kind {self.kind!r}: {_POLICY_FORMS}.")
        if self.kind == "original":
            if self.width or self.height:
                raise ValueError(f"size policy 'original' takes no size: {_POLICY_FORMS}.")
            return
        for v in (self.width, self.height):
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= _MAX_POLICY_SIDE:
                raise ValueError(f"invalid size policy {self.kind}:{self.width}x{self.height}: {_POLICY_FORMS}.")
        if self.kind in ("max", "min") and self.width != self.height:
            raise ValueError(f"size policy '{self.kind}' takes one size N: {_POLICY_FORMS}.")

    @classmethod
    def parse(cls, spec: str) -> SizePolicy:
        """Parse 'original', 'max:N', 'min:N', 'fixed:N' or 'fixed:WxH' (case-insensitive)."""
        if not isinstance(spec, str):
            raise ValueError(f"invalid size policy {spec!r}: {_POLICY_FORMS}.")
        s = spec.strip().lower()
        if s in ("original", "orig"):
            return cls("original")
        m = _POLICY_RE.match(s)
        if not m:
            raise ValueError(f"invalid size policy {spec!r}: {_POLICY_FORMS}.")
        kind, a, b = m.group(1), int(m.group(2)), m.group(3)
        if b is not None and kind != "fixed":
            raise ValueError(f"invalid size policy {spec!r}: {_POLICY_FORMS}.")
        w, h = a, int(b) if b is not None else a
        if not (0 < w <= _MAX_POLICY_SIDE and 0 < h <= _MAX_POLICY_SIDE):
            raise ValueError(f"invalid size policy {spec!r}: {_POLICY_FORMS}.")
        return cls(kind, w, h)

    @property
    def spec(self) -> str:
        """Canonical spec string, accepted back by parse() (e.g. 'max:1024', 'fixed:640x480')."""
        if self.kind == "original":
            return "original"
        if self.kind == "fixed" and self.width != self.height:
            return f"fixed:{self.width}x{self.height}"
        return f"{self.kind}:{self.width}"

    @property
    def tag(self) -> str:
        """Short name-safe tag: 'orig', 'max1024', 'min800', 'fixed586', 'fixed640x480'."""
        return "orig" if self.kind == "original" else self.spec.replace(":", "")

    def __str__(self) -> str:
        """The canonical spec."""
        return self.spec

    def target(self, w: int, h: int, scale: float = 1.0) -> tuple[int, int]:
        """Output (width, height) for an input of w x h at an extra scale factor (rounded, >= 1)."""
        if w <= 0 or h <= 0:
            raise ValueError(f"image size must be positive, got {w}x{h}.")
        if not scale > 0 or math.isinf(scale):
            raise ValueError(f"scale must be a positive number, got {scale}.")
        if self.kind == "original":
            return _round(w * scale), _round(h * scale)
        if self.kind == "fixed":
            return _round(self.width * scale), _round(self.height * scale)
        side = max(w, h) if self.kind == "max" else min(w, h)
        f = self.width * scale / side
        return _round(w * f), _round(h * f)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


class ImageError(Exception):
    """A single image could not be used; str() is a one-line human reason.

    `transient`: the cause may go away (permissions, memory, I/O), so a rerun retries it;
    otherwise the bytes are not usable and only a change of the file is worth a retry.
    `scope`: "file" when any extractor would fail the same way, "extractor" when the failure
    comes from this extractor's settings (size policy, pixel limit), so another may succeed.
    """

    def __init__(self, reason: str, transient: bool = False, scope: str = "file") -> None:
        super().__init__(reason)
        self.transient = transient
        self.scope = scope
        self.file_size: int | None = None  # facts of the file, when it could be read
        self.mtime: float | None = None
        self.sha: str | None = None


@dataclass
class DecodedImage:
    """One decoded file: RGB uint8 pixels per requested scale plus file facts for the store."""

    pixels: list[np.ndarray]  # one (H, W, 3) uint8 RGB array per requested scale, in order
    width: int  # original width, after EXIF orientation
    height: int  # original height, after EXIF orientation
    file_size: int  # bytes
    mtime: float  # st_mtime
    sha: str  # blake2b (digest_size=16) hex digest of the file bytes
    extras: dict = field(default_factory=dict)  # what iter_decoded's `after` computed


_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_WHITE = (255, 255, 255)


def _first_line(e: BaseException) -> str:
    """First line of an exception's message (or its type name), shortened."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8 (1 when absent or unreadable: bad metadata must not lose the image)."""
    try:
        o = int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:
        return 1
    return o if o in _TRANSPOSE else 1


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    """I;16*/I/F -> L by the value range [min(0, min), max]: zero stays black, nothing is clipped."""
    a = np.asarray(im).astype(np.float32)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, 0.0)
    if a.size == 0:
        return Image.new("L", im.size)
    lo = min(0.0, float(a.min()))
    hi = float(a.max())
    if hi <= lo:
        out = np.zeros(a.shape, dtype=np.uint8)
    else:
        out = np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    return Image.fromarray(out if out.ndim == 2 else out[..., 0])


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; alpha and palette/tRNS transparency are composited onto white."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_l(im).convert("RGB")
    has_alpha = "A" in mode or "a" in mode or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def classify_decode_error(e: BaseException) -> str:
    """Map a Pillow/OS decoding exception to a one-line reason."""
    msg = _first_line(e)
    low = msg.lower()
    if isinstance(e, UnidentifiedImageError):
        return "not an image (cannot identify image file)"
    if isinstance(e, Image.DecompressionBombError):
        nums = [int(n) for n in re.findall(r"\d+", msg)]
        if len(nums) >= 2:
            return (
                f"image too large: {nums[0]:,} pixels exceeds Pillow's decompression-bomb limit of {nums[1]:,}"
            )
        return f"image too large: {msg}"
    if isinstance(e, MemoryError):
        return "image too large: out of memory while decoding"
    if isinstance(e, EOFError) or "truncated" in low or "unexpected end" in low:
        return "truncated file"
    if "broken data stream" in low:
        return "corrupt image data (broken data stream)"
    if isinstance(e, SyntaxError):
        return f"corrupt image data ({msg})"
    if isinstance(e, OSError):
        return f"cannot decode image ({msg})"
    return f"cannot decode image ({type(e).__name__}: {msg})"


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """Scales as a tuple of positive finite floats (a programming error raises ValueError)."""
    out = tuple(float(s) for s in scales)
    if not out or any(not s > 0 or math.isinf(s) for s in out):
        raise ValueError(f"scales must be positive finite numbers, got {tuple(scales)!r}.")
    return out


def upright_size(source: str | Path | bytes) -> tuple[int, int]:
    """(width, height) of an image file or its bytes as ingest sees it (EXIF orientation
    applied), read from its header alone; a bad file is an ImageError."""
    import io

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            w, h = im.size
            return (h, w) if _orientation(im) in (5, 6, 7, 8) else (w, h)
    except OSError as exc:
        raise ImageError(classify_decode_error(exc)) from None
    except Exception as exc:  # Pillow raises many kinds on a bad header
        raise ImageError(classify_decode_error(exc)) from None


def load_query_image(path: str | Path, settings: dict,
                     crop: tuple[float, float, float, float] | None = None) -> DecodedImage:
    """A query image decoded exactly as ingest decoded the store's (its extractor `settings`:
    size policy, scales, pixel limit); a bad file is a one-line UserError."""
    try:
        return load_image(path, SizePolicy.parse(settings["size"]), tuple(settings["scales"]),
                          max_pixels=int(settings.get("max_pixels", DEFAULT_MAX_PIXELS)), crop=crop)
    except ImageError as exc:
        raise UserError(f"cannot use query image {path}: {exc}") from None


def decode_query_bytes(data: bytes, settings: dict,
                       crop: tuple[float, float, float, float] | None = None,
                       max_pixels: int | None = None) -> DecodedImage:
    """The bytes of a query image (an upload) decoded exactly as ingest decoded the store's (its
    extractor `settings`); `max_pixels` lowers the store's pixel limit. Any failure is an
    ImageError with a one-line reason."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    limit = int(settings.get("max_pixels", DEFAULT_MAX_PIXELS))
    if max_pixels is not None:
        limit = min(limit, int(max_pixels))
    sha = hashlib.blake2b(data, digest_size=16).hexdigest()
    return _decode(data, 0.0, sha, SizePolicy.parse(settings["size"]),
                   check_scales(settings["scales"]), limit, DEFAULT_MIN_SIDE, crop)


def read_image_file(path: Path) -> tuple[bytes, os.stat_result]:
    """A regular, non-empty file's bytes and stat; otherwise an ImageError (a read error is
    transient: permissions or I/O may heal)."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file")
        with open(path, "rb") as f:
            data = f.read()
    except ImageError:
        raise
    except OSError as e:
        raise ImageError(f"cannot read file ({os_error_reason(e)})", transient=True) from None
    if not data:
        raise ImageError("empty file (0 bytes)")
    return data, st


def load_image(
    path: str | Path,
    policy: SizePolicy,
    scales: Sequence[float] = (1.0,),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    crop: tuple[float, float, float, float] | None = None,
) -> DecodedImage:
    """Decode one file to RGB uint8 at each scale of the policy; any failure is an ImageError.

    `crop` = (x1, y1, x2, y2) in pixels of the upright original keeps only that box (a query
    region, as in the Oxford/Paris protocol); the size policy then applies to the box.
    """
    path = Path(path)
    scales = check_scales(scales)
    # Read the bytes once: hash them and decode from memory (the file may change meanwhile).
    data, st = read_image_file(path)
    sha = hashlib.blake2b(data, digest_size=16).hexdigest()
    try:
        return _decode(data, st.st_mtime, sha, policy, scales, max_pixels, min_side, crop)
    except ImageError as e:  # the file facts travel with the error (the store records them)
        e.file_size, e.mtime, e.sha = len(data), st.st_mtime, sha
        raise


@dataclass
class DecodePlan:
    """What the header says and the settings ask: upright size, orientation, box, targets."""

    width: int
    height: int
    orientation: int
    swap: bool
    box: tuple[int, int, int, int] | None
    targets: list[tuple[int, int]]


def plan_decode(im: Image.Image, policy: SizePolicy, scales: tuple[float, ...], max_pixels: int,
                min_side: int, crop: tuple[float, float, float, float] | None) -> DecodePlan:
    """Check an opened (not yet decoded) image against the limits; its targets per scale."""
    sw, sh = im.size  # stored (pre-orientation) size, from the header
    if sw <= 0 or sh <= 0:
        raise ImageError(f"invalid image size {sw}x{sh} in header")
    if sw * sh > max_pixels:
        raise ImageError(
            f"image too large: {sw}x{sh} pixels exceeds the limit of {max_pixels:,}",
            scope="extractor")
    orientation = _orientation(im)
    swap = orientation in (5, 6, 7, 8)
    w, h = (sh, sw) if swap else (sw, sh)
    if min(w, h) < min_side:  # upscaling a thumbnail would invent the detail it lacks
        raise ImageError(
            f"image too small: {w}x{h}, needs at least {min_side} px per side"
        )
    box = None
    if crop is not None:
        x1, y1, x2, y2 = (max(0, min(int(round(c)), lim)) for c, lim in
                          zip(crop, (w, h, w, h)))
        if x2 - x1 < min_side or y2 - y1 < min_side:
            raise ImageError(f"crop box {tuple(crop)} leaves {max(0, x2 - x1)}x"
                             f"{max(0, y2 - y1)} px of a {w}x{h} image, needs at least "
                             f"{min_side} px per side")
        box = (x1, y1, x2, y2)
    tw0, th0 = (box[2] - box[0], box[3] - box[1]) if box else (w, h)
    targets = [policy.target(tw0, th0, s) for s in scales]
    for tw, th in targets:
        if min(tw, th) < min_side:
            how = "" if (tw, th) == (w, h) else " after resizing"
            raise ImageError(
                f"image too small: {tw}x{th}{how}, needs at least {min_side} px per side",
                scope="extractor")
        if tw * th > max_pixels:
            raise ImageError(
                f"image too large: {tw}x{th} pixels after resizing exceeds the limit of "
                f"{max_pixels:,}", scope="extractor")
    return DecodePlan(w, h, orientation, swap, box, targets)


def _decode(data: bytes, mtime: float, sha: str, policy: SizePolicy,
            scales: tuple[float, ...], max_pixels: int, min_side: int,
            crop: tuple[float, float, float, float] | None) -> DecodedImage:
    """The decoding half of load_image (bytes in memory -> pixels at each scale)."""
    try:
        with Image.open(io.BytesIO(data), formats=open_formats()) as im:
            plan = plan_decode(im, policy, scales, max_pixels, min_side, crop)
            w, h, orientation, swap = plan.width, plan.height, plan.orientation, plan.swap
            box, targets = plan.box, plan.targets
            if isinstance(im, JpegImagePlugin.JpegImageFile) and box is None:
                # Decode at 1/2, 1/4 or 1/8 size in the DCT when every target is that much smaller
                # (draft never goes below the requested size, so the exact resize below is a downscale).
                need_w = max(t[0] for t in targets)
                need_h = max(t[1] for t in targets)
                im.draft("RGB", (need_h, need_w) if swap else (need_w, need_h))
            im.load()
            img: Image.Image = im
            if orientation != 1:
                img = img.transpose(_TRANSPOSE[orientation])
            img = _to_rgb(img)
            if box is not None:
                img = img.crop(box)
            pixels: list[np.ndarray] = []
            for tw, th in targets:
                out = img if img.size == (tw, th) else img.resize(
                    (tw, th), Image.Resampling.BICUBIC, reducing_gap=3.0
                )
                arr = np.asarray(out, dtype=np.uint8)
                if arr.ndim != 3 or arr.shape != (th, tw, 3):  # defensive: never hand out a bad shape
                    raise ImageError(f"decoder returned an unexpected array shape {arr.shape}")
                if not arr.flags.writeable or not arr.flags.c_contiguous:
                    arr = np.array(arr, dtype=np.uint8, order="C")
                pixels.append(arr)
    except ImageError:
        raise
    except Exception as e:  # every Pillow/OS/decoder failure becomes a one-line reason
        raise ImageError(classify_decode_error(e), transient=isinstance(e, MemoryError)) from None

    return DecodedImage(
        pixels=pixels, width=w, height=h, file_size=len(data), mtime=mtime, sha=sha
    )


def _load_or_error(
    path: Path, policy: SizePolicy, scales: Sequence[float], max_pixels: int, min_side: int,
    after: Callable[[DecodedImage], dict] | None = None,
    load: Callable[..., DecodedImage] | None = None,
) -> DecodedImage | ImageError:
    """load_image (or `load`, same signature; then `after`, whose dict goes to `extras`),
    with the ImageError returned instead of raised (for the prefetch pool)."""
    try:
        image = (load or load_image)(path, policy, scales, max_pixels=max_pixels,
                                     min_side=min_side)
        if after is not None:
            try:
                image.extras = after(image)
            except Exception as exc:  # e.g. OpenCV refusing an image: this file only
                raise ImageError(f"{type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}",
                                 scope="extractor") from None
        return image
    except ImageError as e:
        # Drop the frames (they hold the file bytes): callers may keep thousands of errors.
        e.__traceback__ = None
        if e.__context__ is not None:
            e.__context__.__traceback__ = None
        return e
    except Exception as e:  # pragma: no cover - load_image converts everything; belt and braces
        return ImageError(f"unexpected error ({type(e).__name__}: {_first_line(e)})")


def iter_decoded(
    paths: Iterable[str | Path],
    policy: SizePolicy,
    scales: Sequence[float] = (1.0,),
    workers: int = 4,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    prefetch: int = 64,
    after: Callable[[DecodedImage], dict] | None = None,
    load: Callable[..., DecodedImage] | None = None,
) -> Iterator[tuple[int, Path, DecodedImage | ImageError]]:
    """Decode files in a thread pool, yielding (index, path, image or error) in input order, bounded memory.

    `after(image)`, when given, runs in the worker thread too (per-image CPU work such as SIFT
    keypoints, off the main thread); its dict lands in `image.extras`. `load` replaces
    `load_image` (same signature), e.g. to leave JPEG decoding to the GPU.
    """
    scales = check_scales(scales)
    if workers <= 0:
        for i, p in enumerate(paths):
            p = Path(p)
            yield i, p, _load_or_error(p, policy, scales, max_pixels, min_side, after, load)
        return

    window = max(int(prefetch), int(workers), 1)  # images in flight (queued, decoding or done)
    source = iter(enumerate(paths))
    pending: deque[tuple[int, Path, Future[DecodedImage | ImageError]]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgdb-decode")
    try:
        exhausted = False
        while True:
            while not exhausted and len(pending) < window:
                try:
                    i, p = next(source)
                except StopIteration:
                    exhausted = True
                    break
                p = Path(p)
                pending.append(
                    (i, p, pool.submit(_load_or_error, p, policy, scales, max_pixels, min_side,
                                       after, load))
                )
            if not pending:
                break
            i, p, fut = pending.popleft()
            result = fut.result()
            del fut
            yield i, p, result
    finally:
        for _, _, fut in pending:
            fut.cancel()
        pending.clear()
        pool.shutdown(wait=True, cancel_futures=True)
