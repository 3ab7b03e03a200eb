"""`query --html`: a self-contained gallery page (thumbnails embedded, opens in any browser)."""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

from ..errors import UserError
from .service import QueryResult

THUMB = 240

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}
h1{font-size:20px} h2{font-size:16px;margin-top:32px}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
figure{margin:0;width:%dpx;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px}
figure.query{border:2px solid #2a6df4}
figure img{display:block;max-width:100%%;max-height:%dpx;margin:auto}
figcaption{font-size:12px;margin-top:4px;word-break:break-all}
.score{font-weight:600}
""" % (THUMB, THUMB)


def thumbnail_data_uri(path: str | Path) -> str | None:
    """A small JPEG of the image (upright), as a data: URI; None if it cannot be read."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.thumbnail((THUMB * 2, THUMB * 2))
            if im.mode not in ("RGB", "L"):
                background = Image.new("RGB", im.size, (255, 255, 255))
                rgba = im.convert("RGBA")
                background.paste(rgba, mask=rgba.getchannel("A"))
                im = background
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="JPEG", quality=85)
    except Exception:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _figure(path: str, caption: str, css_class: str = "") -> str:
    uri = thumbnail_data_uri(path)
    img = (f'<img src="{uri}" alt="{html.escape(Path(path).name)}">' if uri
           else '<div class="missing">(image unavailable)</div>')
    return (f'<figure class="{css_class}">{img}<figcaption>{caption}</figcaption></figure>')


def write_gallery(results: list[QueryResult], out: Path, title: str) -> None:
    """Write the page atomically (temporary file, then rename)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for res in results:
        parts.append(f"<h2>query: {html.escape(res.query)}</h2><div class='row'>")
        parts.append(_figure(res.query, f"query ({res.source})<br>{html.escape(res.query)}", "query"))
        for hit in res.hits:
            caption = (f"#{hit.rank} <span class='score'>{hit.score:.4f}</span> id {hit.id}<br>"
                       f"{html.escape(hit.path)}")
            parts.append(_figure(hit.path, caption))
        parts.append("</div>")
    parts.append("</body></html>")
    out = Path(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("\n".join(parts), encoding="utf-8", errors="backslashreplace")
        os.replace(tmp, out)
    except OSError as exc:
        try:
            tmp.unlink()  # never leave the temporary file behind
        except OSError:
            pass
        raise UserError(f"cannot write the gallery {out}: {exc.strerror or exc}") from None
