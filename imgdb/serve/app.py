"""The HTTP face of `imgdb serve` (FastAPI on uvicorn): one page, a JSON API, store images by id.

Routes: `GET /` (the page), `GET /static/{app.js,style.css}`, `GET /info`, `POST /query`
(multipart or urlencoded form: `image` file or `id`; `k`, `bbox`, `qe`, `rerank`, `graph`,
`index`), `GET
/images/{id}?size=thumb|full`, `GET /queries/{token}/image`, `GET /explain`. Errors are JSON
`{"error": "one line"}` with a 4xx status. Safe by default: binds the loopback address, checks
the Host header against it (no DNS rebinding), serves only images that are rows of the store
(by id, re-encoded as JPEG, and only while the file still holds what was ingested), limits
request bytes and image pixels.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..errors import InvalidRequest, StoreDamaged, StoreError, UserError
from .engine import MAX_K, MAX_QE, Engine, RequestError, array_jpeg, explain

STATIC = Path(__file__).with_name("static")
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                               "style-src 'self'; script-src 'self'; object-src 'none'; "
                               "frame-ancestors 'none'",
}


class BodyTooLarge(Exception):
    pass


class Limits:
    def __init__(self, max_upload_bytes: int = 32 << 20) -> None:
        self.max_upload_bytes = int(max_upload_bytes)


class _Guard:
    """ASGI middleware: request bodies over the limit are refused (413) by their declared length
    or, when streamed, once they pass it; Host must be an allowed name; a request from another
    site's page is refused (403); security headers."""

    def __init__(self, app, limit: int, hosts: list[str] | None) -> None:
        self.app, self.limit, self.hosts = app, limit, hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if self.hosts is not None:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.hosts:
                return await _send_error(send, 400, f"host {host!r} is not served here "
                                                    f"(allowed: {', '.join(self.hosts)})")
        refused = _foreign_origin(headers, scope.get("scheme", "http"))
        if refused:
            return await _send_error(send, 403, refused)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_error(send, 413, f"request body over the limit of "
                                                f"{self.limit // (1 << 20)} MiB")
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge
            return message

        async def with_headers(message):
            if message["type"] == "http.response.start":
                extra = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = dict(message, headers=list(message.get("headers", [])) + extra)
            await send(message)

        await self.app(scope, limited, with_headers)


def _foreign_origin(headers: dict[str, str], scheme: str) -> str | None:
    """Why a request was sent by another site's page, or None. A browser names the page
    behind every request (Sec-Fetch-Site; Origin on POST and scripted ones): only the served
    page itself, or an address typed by the user, may make this machine compute. Other
    clients (curl, scripts) send neither and are served."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return f"requests from other sites' pages are refused (Sec-Fetch-Site: {site})"
    origin = headers.get("origin")
    if origin is not None and origin != f"{scheme}://{headers.get('host', '')}":
        return f"requests from other sites' pages are refused (Origin: {origin})"
    return None


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


#: how the API spells a request field (the form field names)
FORM_FIELDS = {"ids": "id", "images": "image", "model": "index"}


def form_field(field: str) -> str:
    """The form field of a request field the library names."""
    return FORM_FIELDS.get(field, field)


def _field(form, name: str) -> str | None:
    """A text field of the form ('' counts as absent); a file there is refused."""
    value = form.get(name)
    if isinstance(value, UploadFile):
        raise RequestError(f"{name} must be text, not a file", 400)
    return None if value is None or value == "" else str(value)


def _int(text, name: str, default: int, lo: int, hi: int) -> int:
    if text is None or text == "":
        return default
    if isinstance(text, UploadFile):
        raise RequestError(f"{name} must be a number, not a file", 400)
    try:
        value = int(str(text).strip())
    except ValueError:
        raise RequestError(f"{name} must be an integer from {lo} to {hi}, not {str(text)[:40]!r}",
                           400) from None
    if not lo <= value <= hi:
        raise RequestError(f"{name} must be from {lo} to {hi}, not {value}", 400)
    return value


def _row(text) -> int:
    from ..retrieval.request import parse_row

    return parse_row(text)


def query_values(form) -> dict:
    """The query request's values from a form, parsed by the request's own parsers (the CLI's
    too) within the server's limits: k, qe, rerank, graph, bbox, regions, turns."""
    from ..retrieval.request import parse_bbox, parse_k, parse_qe, parse_rerank

    k = _field(form, "k")
    qe = parse_qe(_field(form, "qe") or "0")
    if qe is not None and qe.m > MAX_QE:
        raise InvalidRequest(f"must be at most {MAX_QE} neighbours here, not {qe.m}", "qe")
    rerank = _field(form, "rerank")
    bbox = _field(form, "bbox")
    return {"k": parse_k(k, MAX_K) if k is not None else 10, "qe": qe,
            "rerank": parse_rerank(rerank) if rerank is not None else (),
            "graph": _field(form, "graph"),
            "bbox": parse_bbox(bbox) if bbox is not None else None,
            "regions": _flag(form, "regions"), "turns": _flag(form, "turns")}


def _flag(form, name: str) -> bool:
    """A form field that switches something on: 0/1 (also true/false, on/off)."""
    text = (_field(form, name) or "0").strip().lower()
    if text not in ("0", "1", "true", "false", "on", "off"):
        raise InvalidRequest(f"must be 0 or 1, not {text[:20]!r}", name)
    return text in ("1", "true", "on")


@dataclass
class _Query:
    """One query as the server took it: a stored row and/or the image decoded for each
    extractor (with the batcher's futures of their descriptions, when they need a forward)."""

    row: int | None
    width: int
    height: int
    decoded: dict = field(default_factory=dict)
    futures: dict | None = None
    token: str | None = None
    data: bytes | None = None  # an upload's bytes

    def as_input(self, bbox=None):
        """The query as the query service takes it (keypoints for verification, crops for a
        regional search)."""
        from ..retrieval.service import QueryInput

        if self.data is None:  # (a box of a stored image crops its other views)
            return QueryInput(str(self.row), row=self.row, crop=bbox)
        first = next(iter(self.decoded.values()))
        return QueryInput("upload", image=self.decoded, sha=first.sha, data=self.data,
                          crop=bbox)

    @property
    def source(self) -> str:
        return "extracted" if self.futures else "store"


async def _take_query(engine: Engine, limits: "Limits", plan, upload, id_text: str | None,
                      bbox, timing: dict) -> _Query:
    """A stored id (decoded again only to crop it), or an upload decoded as ingest decodes
    (its stored vector when its bytes are a stored file); forwards go to the batcher."""
    extractors = await asyncio.to_thread(engine.extractors, plan)
    if id_text is not None:
        row = _row(id_text)
        for ext in extractors:
            engine.check_row(row, ext)
        state = engine.state()
        q = _Query(row, int(state.width[row]), int(state.height[row]))
        if bbox is None:
            return q
        load = lambda ext: engine.load_row(row, ext, bbox)  # noqa: E731
    else:
        data = await upload.read()
        if len(data) > limits.max_upload_bytes:
            raise BodyTooLarge
        q = None
        load = lambda ext: engine.decode(data, ext, bbox)  # noqa: E731
    with engine.batcher.announce():
        t0 = time.perf_counter()
        decoded = {ext: await asyncio.to_thread(load, ext) for ext in extractors}
        timing["decode_ms"] = (time.perf_counter() - t0) * 1000
        first = decoded[extractors[0]]
        if q is None:
            q = _Query(engine.stored_row(first.sha, extractors) if bbox is None else None,
                       first.width, first.height, data=data)
        q.decoded = decoded
        if bbox is not None or q.row is None:
            q.futures = {ext: engine.batcher.submit(ext, im) for ext, im in decoded.items()}
    q.token = engine.keep_query(extractors[0], first, q.row)
    return q


async def _raw_vector(engine: Engine, plan, q: _Query, timing: dict):
    """The query's raw vector: described by the batcher's forward, or the stored one."""
    if not q.futures:
        return await asyncio.to_thread(engine.stored_vector, plan, q.row)
    t0 = time.perf_counter()
    described = {ext: await asyncio.wrap_future(f) for ext, f in q.futures.items()}
    timing["forward_ms"] = (time.perf_counter() - t0) * 1000
    return await asyncio.to_thread(engine.combine, plan, described)


def _query_response(engine: Engine, choice, plan, ask, q: _Query, bbox, hits, timing,
                    verified: dict | None = None) -> dict:
    token = q.token
    results = engine.results(hits)
    for hit in results:  # what verification found: inliers, matches, the result's outline
        found = (verified or {}).get(hit["id"])
        if found is not None:
            hit["verification"] = {k: found[k] for k in ("inliers", "transform", "matches",
                                                          "outline", "result_pixels")}
    return {
        "query": {"source": q.source, "id": q.row, "token": token,
                  "image": f"/queries/{token}/image" if token else f"/images/{q.row}?size=full",
                  "width": q.width, "height": q.height, "bbox": list(bbox) if bbox else None},
        "search": {"key": choice.key, "descriptor": plan.descriptor,
                   "model": plan.model or "none", "index": plan.index,
                   "exact": plan.index is None, "note": plan.note,
                   "stages": [st.spec for st in ask.chain]},
        "k": ask.k, "qe": ask.qe.m if ask.qe is not None and ask.qe.alpha == 0 else
        (ask.qe.spec if ask.qe is not None else 0),
        "rerank": ",".join(st.spec for st in ask.rerank) or None,
        "results": results,
        "timing_ms": {name: round(v, 2) for name, v in timing.items()},
    }


def create_app(engine: Engine, limits: Limits | None = None,
               allowed_hosts: list[str] | None = None):
    """The ASGI app around an engine (`allowed_hosts` None: any Host header)."""
    limits = limits or Limits()
    app = FastAPI(title="imgdb", docs_url=None, redoc_url=None, openapi_url=None)
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return _error(exc.status, str(exc))

    @app.exception_handler(StoreError)
    async def _store_error(request, exc: StoreError):
        return _error(503 if not isinstance(exc, StoreDamaged) else 500, str(exc))

    @app.exception_handler(InvalidRequest)
    async def _invalid_request(request, exc: InvalidRequest):
        return _error(400, exc.render(form_field))

    @app.exception_handler(UserError)
    async def _user_error(request, exc: UserError):
        return _error(409, exc.render(form_field))

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, exc):
        return _error(413, f"request body over the limit of "
                           f"{limits.max_upload_bytes // (1 << 20)} MiB")

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail) if exc.status_code != 404 else
                      f"not found: {request.url.path[:80]}")

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):  # still one JSON line, never a plain-text page
        first = (str(exc).splitlines() or [""])[0][:200]
        return _error(500, f"unexpected {type(exc).__name__}: {first} (a bug in imgdb)")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path"))
        return _error(400, f"bad {where or 'request'}: {first.get('msg', 'invalid')}")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC_FILES:
            raise RequestError(f"not found: /static/{name[:40]}", 404)
        return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name])

    @app.get("/info")
    async def info():
        return await asyncio.to_thread(engine.info)

    @app.get("/images/{image_id}")
    async def image(image_id: str, size: str = "thumb"):
        row = _row(image_id)
        data = await asyncio.to_thread(engine.picture, row, size)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=60"})

    @app.get("/queries/{token}/image")
    async def query_picture(token: str):
        q = engine.query_image(token)
        data = await asyncio.to_thread(array_jpeg, q.image.pixels[0])
        return Response(data, media_type="image/jpeg")

    @app.post("/query")
    async def query(request: Request):
        started = time.perf_counter()
        try:
            form = await request.form(max_files=1, max_fields=16)
        except BodyTooLarge:
            raise
        except Exception as exc:
            raise RequestError(f"the request is not a readable form ({type(exc).__name__}); "
                               f"send multipart/form-data with image=FILE or id=N", 400) from None
        upload, id_text = form.get("image"), _field(form, "id")
        if (upload is None or upload == "") == (id_text is None):
            raise RequestError("give an image file (image=FILE) or a stored id (id=N), one of "
                               "them", 400)
        if upload is not None and upload != "" and not isinstance(upload, UploadFile):
            raise RequestError("image must be a file upload (multipart/form-data)", 400)
        values = query_values(form)
        bbox = values.pop("bbox")
        choice = await asyncio.to_thread(engine.choice,
                                         _field(form, "index") or _field(form, "descriptor"))
        ask = choice.request(**values)
        if ask.graph is not None and not ask.rerank:
            ask.check(ids=1)  # the one message for a graph without a re-ranking
        plan = await asyncio.to_thread(engine.plan, ask)
        timing: dict[str, float] = {}
        q = await _take_query(engine, limits, plan, upload, id_text, bbox, timing)
        raw = await _raw_vector(engine, plan, q, timing)
        t0 = time.perf_counter()
        hits, verified = await asyncio.to_thread(engine.rank, plan, ask, raw, q.as_input(bbox),
                                                 (q.width, q.height))
        timing["search_ms"] = (time.perf_counter() - t0) * 1000
        timing["total_ms"] = (time.perf_counter() - started) * 1000
        return _query_response(engine, choice, plan, ask, q, bbox, hits, timing, verified)

    @app.get("/explain")
    async def explain_map(request: Request, result: str, map: str = "similarity",
                          on: str = "query", query: str | None = None, query_id: str | None = None,
                          index: str | None = None, patch: str | None = None,
                          stride: str | None = None, style: str = "layer"):
        from ..retrieval.explain import describe_map, heat_rgba, overlay, png_bytes

        if style not in ("layer", "overlay"):
            raise RequestError("style must be layer or overlay", 400)
        choice = await asyncio.to_thread(engine.choice, index)
        q = engine.query_image(query) if query else None
        row = _row(query_id) if query_id not in (None, "") else None
        patch_px = _int(patch, "patch", 0, 0, 4096) or None
        stride_px = _int(stride, "stride", 0, 0, 4096) or None
        gone = threading.Event()
        future = engine.explain_pool.submit(explain, engine, map, on, choice, _row(result), q,
                                            row, patch_px, stride_px, gone.is_set)
        m, base = await _unless_gone(request, future, gone)
        picture = overlay(base, m.pixels, m.signed) if style == "overlay" else \
            heat_rgba(m.pixels, m.signed)
        numbers = {k: v for k, v in m.info.items() if isinstance(v, (int, float, str))}
        header = json.dumps({"map": m.kind, "on": on, "text": describe_map(m), **numbers})
        return Response(png_bytes(picture), media_type="image/png",
                        headers={"X-Imgdb-Map": header, "Cache-Control": "no-store"})

    return _Guard(app, limits.max_upload_bytes, allowed_hosts)


async def _unless_gone(request: Request, future, gone: threading.Event):
    """The result of `future` (work on a thread), or, when the client disconnects first, set
    `gone` so that the work stops at its next check (a map of a closed tab takes no more
    forwards, nor the explain worker from the next request)."""
    from ..retrieval.explain import Cancelled

    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.25)
        if done:
            try:
                return waiting.result()
            except Cancelled:
                raise RequestError("the client went away", 499) from None
        if await request.is_disconnected():
            gone.set()
            future.cancel()  # not started yet: never starts
            raise RequestError("the client went away", 499)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(db: Path, host: str = "127.0.0.1", port: int = 8000, descriptor: str | None = None,
          index: str | None = None, device: str = "auto", max_upload_mb: int = 32,
          max_pixels: int = 40_000_000, announce: Callable[[str], None] | None = None) -> None:
    """Load everything, bind, print the address, serve until Ctrl-C."""
    import uvicorn

    announce = announce or (lambda line: print(line, flush=True))
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"cannot bind to host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)  # connections wait in the backlog until the server accepts them
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another "
                        f"{{port}}", mentions=("port",)) from None
    engine = Engine(db, descriptor, index, device, max_pixels)
    hosts = None
    if _is_loopback(host):
        hosts = sorted(set(LOOPBACK_NAMES + [host]))
    else:
        print(f"warning: serving on {host}: every image of the store is visible to whoever "
              f"reaches this address", file=sys.stderr, flush=True)
    app = create_app(engine, Limits(max_upload_mb << 20), hosts)
    real_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    state = engine.state()
    announce(f"serving {db} ({int(state.valid[engine.default.descriptor.split('/')[0]].sum())} "
             f"images, {engine.default.key}) at http://{shown}:{real_port}/ (Ctrl-C to stop)")
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
