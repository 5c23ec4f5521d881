"""REST server and web page: ``imgclf serve MODEL`` (FastAPI + uvicorn).

Endpoints (JSON errors everywhere: ``{"error": {"code": ..., "message": ...}}``):

* ``POST /v1/predict``  one or more images as multipart field ``file`` (repeat the field for
  several) → class probabilities, predicted class, the decision threshold used, model id;
* ``POST /v1/explain``  one image → Grad-CAM overlay PNG; only when :mod:`imgclf.explain.gradcam`
  can be imported and the model folder (model.json + model.safetensors) is at hand;
* ``GET /v1/model``     model metadata and the server's limits;
* ``GET /healthz``      liveness; ``GET /docs`` OpenAPI UI; ``GET /`` the web page.

Safety: binds 127.0.0.1 unless told otherwise; the request body is streamed through an
in-memory multipart parser with per-file, per-request and file-count limits (nothing is
spooled to disk, unlike Starlette's form parser); the image type is sniffed from the
bytes (JPEG, PNG, GIF, BMP, TIFF, WebP) and Pillow may only use that decoder; the pixel
count is checked from the header before decoding; a bad image is a 4xx JSON answer; an
optional API key (``X-API-Key``) is compared in constant time; models are loaded only
from a verified ONNX export or a safetensors bundle.

Concurrency: decoding runs in worker threads (bounded), inference in one dedicated
thread; requests that arrive within ``batch_wait_ms`` of each other are run as one batch
(up to ``max_batch`` images), so the event loop never blocks on the model.
"""


import asyncio
import hmac
import io
import ipaddress
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf._version import __version__

log = logging.getLogger("imgclf")

MB = 1 << 20
DEFAULT_MAX_UPLOAD_MB = 10.0
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_BATCH_WAIT_MS = 5.0
DEFAULT_MAX_BATCH = 16
DEFAULT_MAX_FILES = 16
API_KEY_HEADER = "X-API-Key"
SUPPORTED_TYPES = "JPEG, PNG, GIF, BMP, TIFF or WebP"
WEB_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass
class ServeConfig:
    api_key: str | None = None
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB  # per image file
    max_pixels: int = DEFAULT_MAX_PIXELS  # width × height, checked before decoding
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    max_batch: int = DEFAULT_MAX_BATCH
    max_files: int = DEFAULT_MAX_FILES  # images per request
    decode_threads: int = max(2, os.cpu_count() or 2)

    def validate(self) -> "ServeConfig":
        if not self.max_upload_mb > 0:
            raise ValueError("--max-upload-mb must be > 0")
        if self.max_pixels < 1:
            raise ValueError("--max-pixels must be >= 1")
        if not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError("--batch-wait-ms must be between 0 and 1000")
        if self.max_batch < 1:
            raise ValueError("--max-batch must be >= 1")
        if self.max_files < 1:
            raise ValueError("--max-files must be >= 1")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key must not be empty")
        return self

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def max_body_bytes(self) -> int:
        return self.max_file_bytes * self.max_files + 64 * 1024  # multipart framing and small fields


class ApiError(Exception):
    """Becomes ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, " ".join(str(message).split()), headers or {}


# --------------------------------------------------------------------------- uploads


def sniff_image_type(data: bytes) -> str | None:
    """Pillow format name from the leading bytes, for the formats imgclf accepts; else None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data.startswith(b"BM") and len(data) >= 26:
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _clean_name(name: str | None, index: int) -> str:
    name = "".join(ch for ch in (name or "") if ch.isprintable()).strip()
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    return (name[:120] or f"upload-{index + 1}")


@dataclass
class Upload:
    field: str
    filename: str
    data: bytes


async def read_multipart(request, config: ServeConfig) -> list[Upload]:
    """Stream the body through python-multipart in memory, enforcing every limit as bytes arrive."""
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or not params.get(b"boundary"):
        raise ApiError(415, "not-multipart", "send the image(s) as multipart/form-data, field 'file' (e.g. curl -F file=@photo.jpg)")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_n = int(declared)
        except ValueError:
            raise ApiError(400, "bad-request", "invalid Content-Length header") from None
        if declared_n > config.max_body_bytes:
            raise ApiError(413, "request-too-large", f"request body of {declared_n:,} bytes exceeds the limit of {config.max_body_bytes:,} bytes ({config.max_files} files of at most {config.max_upload_mb:g} MB)")

    parts: list[Upload] = []
    cur: dict = {}
    header_field = bytearray()
    header_value = bytearray()

    def on_part_begin():
        cur.clear()
        cur.update(headers={}, chunks=[], size=0)

    def on_header_field(data, start, end):
        header_field.extend(data[start:end])

    def on_header_value(data, start, end):
        header_value.extend(data[start:end])

    def on_header_end():
        cur["headers"][bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished():
        disp, opts = parse_options_header(cur["headers"].get(b"content-disposition", b""))
        cur["name"] = opts.get(b"name", b"").decode("utf-8", "replace")
        fname = opts.get(b"filename")
        cur["filename"] = fname.decode("utf-8", "replace") if fname is not None else None
        n_files = sum(1 for p in parts if p.field == "file") + (cur["name"] == "file")
        if n_files > config.max_files:
            raise ApiError(413, "too-many-files", f"at most {config.max_files} images per request")

    def on_part_data(data, start, end):
        cur["size"] += end - start
        limit = config.max_file_bytes if cur.get("name") == "file" else 64 * 1024
        if cur["size"] > limit:
            what = f"upload {_clean_name(cur.get('filename'), len(parts))!r}" if cur.get("name") == "file" else f"form field {cur.get('name')!r}"
            raise ApiError(413, "file-too-large", f"{what} exceeds the limit of {limit:,} bytes ({config.max_upload_mb:g} MB per image)")
        cur["chunks"].append(bytes(data[start:end]))

    def on_part_end():
        parts.append(Upload(cur.get("name", ""), _clean_name(cur.get("filename"), len(parts)), b"".join(cur.get("chunks", []))))

    finished = []

    def on_end():
        finished.append(True)

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
            "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished, "on_end": on_end,
        },
        max_header_count=16,
    )
    error: ApiError | None = None
    total = 0
    drain_cap = config.max_body_bytes + 32 * MB  # read (and drop) the rest so the client sees our answer
    stream = request.stream()
    async for chunk in stream:
        total += len(chunk)
        if error is not None:
            if total > drain_cap:
                break
            continue
        if total > config.max_body_bytes:
            error = ApiError(413, "request-too-large", f"request body exceeds the limit of {config.max_body_bytes:,} bytes ({config.max_files} files of at most {config.max_upload_mb:g} MB)")
            parts.clear()
            continue
        try:
            parser.write(chunk)
        except ApiError as e:
            error = e
            parts.clear()
        except MultipartParseError as e:
            error = ApiError(400, "bad-multipart", f"malformed multipart body ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
            parts.clear()
    if error is not None:
        raise error
    try:
        parser.finalize()
    except MultipartParseError:
        raise ApiError(400, "bad-multipart", "malformed or incomplete multipart body") from None
    if not finished:
        raise ApiError(400, "bad-multipart", "incomplete multipart body (no closing boundary)")
    return parts


@dataclass
class DecodedUpload:
    filename: str
    format: str
    width: int
    height: int
    array: np.ndarray  # uint8 (3, S, S)
    image: object = field(default=None, repr=False)  # PIL RGB image (kept only for explain)


_KIND_STATUS = {
    "zero-byte": (400, "empty-file"),
    "not-an-image": (415, "not-an-image"),
    "truncated": (422, "truncated-image"),
    "too-large": (413, "too-many-pixels"),
    "unreadable": (422, "unreadable-image"),
}


def decode_upload(data: bytes, filename: str, prep, max_pixels: int, keep_image: bool = False) -> DecodedUpload:
    """Sniff, check the pixel count from the header, decode as imgclf always does, resize/crop."""
    from PIL import Image, UnidentifiedImageError

    from imgclf.data.imaging import ImageDecodeError, decode_image_bytes
    from imgclf.data.preprocess import draft_size, image_to_array

    if not data:
        raise ApiError(400, "empty-file", f"upload {filename!r} is empty (0 bytes)")
    kind = sniff_image_type(data)
    if kind is None:
        raise ApiError(415, "not-an-image", f"upload {filename!r} is not a {SUPPORTED_TYPES} image (the type is read from the content, not the name)")
    try:
        with Image.open(io.BytesIO(data), formats=[kind]) as probe:
            w, h = probe.size
    except Image.DecompressionBombError:
        raise ApiError(413, "too-many-pixels", f"upload {filename!r}: image has more pixels than the limit of {max_pixels:,}") from None
    except UnidentifiedImageError:
        raise ApiError(422, "corrupt-image", f"upload {filename!r} starts like a {kind} file but its header is corrupt") from None
    except Exception as e:  # noqa: BLE001 - nothing raw escapes to the client
        raise ApiError(422, "corrupt-image", f"upload {filename!r}: unreadable {kind} header ({type(e).__name__})") from None
    if w * h > max_pixels:
        raise ApiError(413, "too-many-pixels", f"upload {filename!r} is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,}")
    try:
        decoded = decode_image_bytes(data, filename, draft_size=draft_size(prep))
    except ImageDecodeError as e:
        status, code = _KIND_STATUS.get(e.kind, (422, "unreadable-image"))
        raise ApiError(status, code, f"upload {e}") from None
    if decoded.format != kind:
        raise ApiError(415, "not-an-image", f"upload {filename!r}: content looks like {kind} but decodes as {decoded.format}")
    try:
        arr = image_to_array(decoded.image, prep)
    except Exception as e:  # noqa: BLE001
        raise ApiError(422, "unreadable-image", f"upload {filename!r}: cannot prepare the image ({type(e).__name__})") from None
    return DecodedUpload(filename, kind, w, h, arr, decoded.image if keep_image else None)


# --------------------------------------------------------------------------- micro-batching


class MicroBatcher:
    """Collect concurrent requests for up to ``wait_ms`` (or ``max_batch`` images), run them
    as one batch in a dedicated inference thread, hand each caller its rows."""

    def __init__(self, fn, *, max_batch: int = DEFAULT_MAX_BATCH, wait_ms: float = DEFAULT_BATCH_WAIT_MS):
        self.fn = fn
        self.max_batch = max_batch
        self.wait_s = wait_ms / 1000.0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgclf-infer")
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.loop = None
        self.requests = 0  # counters for /v1/model's stats
        self.batches = 0
        self.images = 0

    def _ensure_started(self):
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.loop is not loop:
            self.loop = loop
            self.queue = asyncio.Queue()
            self.task = loop.create_task(self._run())

    async def submit(self, batch: np.ndarray) -> np.ndarray:
        self._ensure_started()
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((batch, fut))
        return await fut

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            n = len(items[0][0])
            deadline = loop.time() + self.wait_s
            while n < self.max_batch:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
                items.append(item)
                n += len(item[0])
            live = [(b, f) for b, f in items if not f.cancelled()]
            if not live:
                continue
            batch = np.concatenate([b for b, _ in live]) if len(live) > 1 else live[0][0]
            self.requests += len(live)
            self.batches += 1
            self.images += len(batch)
            try:
                out = await loop.run_in_executor(self.executor, self.fn, batch)
            except Exception as e:  # noqa: BLE001 - handed to every waiter
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            k = 0
            for b, f in live:
                if not f.done():
                    f.set_result(out[k:k + len(b)])
                k += len(b)

    def close(self):
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- model loading


def load_serving_model(model: str | os.PathLike, engine: str = "auto", *, weights=None, cache_dir=None):
    """(predictor with ``predict_proba_arrays``/``info``, bundle folder or None).

    auto: a verified, up-to-date ONNX export (made now if missing; a failed export falls
    back to the PyTorch graph with a warning); onnx: the export or an error; torch: the
    eager PyTorch graph. An ``.onnx`` path is served as is (after its integrity checks).
    """
    from imgclf.export.onnx import ExportError, OnnxClassifier, TorchClassifier, bundle_hashes, predictor_for

    if engine not in ("auto", "onnx", "torch"):
        raise ValueError("--engine must be one of auto, onnx, torch")
    p = Path(model)
    if p.suffix.lower() == ".onnx":
        if engine == "torch":
            raise ValueError(f"{model} is an ONNX export; --engine torch needs the model folder")
        clf = OnnxClassifier(p)
        bundle = None
        if (p.parent / "model.json").is_file() and (p.parent / "model.safetensors").is_file():
            try:
                if bundle_hashes(p.parent)["bundle_id"] == clf.sidecar.get("source", {}).get("bundle_id"):
                    bundle = p.parent
            except Exception:  # noqa: BLE001 - explain simply stays off
                bundle = None
        return clf, bundle
    if engine == "torch":
        clf = TorchClassifier(model, weights=weights, cache_dir=cache_dir)
        return clf, clf.path
    from imgclf.model.bundle import resolve_bundle_dir

    d = resolve_bundle_dir(model)
    try:
        return predictor_for(d, "onnx", weights=weights, cache_dir=cache_dir), d
    except ExportError as e:
        if engine == "onnx":
            raise
        log.warning("ONNX Runtime unavailable for this model (%s); serving the PyTorch graph", e)
        return TorchClassifier(d, weights=weights, cache_dir=cache_dir), d


def explain_module():
    """:mod:`imgclf.explain.gradcam` if it can be imported (it provides gradcam and overlay), else None."""
    import importlib
    import importlib.util

    try:
        if importlib.util.find_spec("imgclf.explain.gradcam") is None:
            return None
        mod = importlib.import_module("imgclf.explain.gradcam")
    except Exception as e:  # noqa: BLE001 - a broken optional module must not stop serving
        log.warning("Grad-CAM endpoint disabled: imgclf.explain.gradcam cannot be imported (%s)", e)
        return None
    if not (callable(getattr(mod, "gradcam", None)) and callable(getattr(mod, "overlay", None))):
        return None
    return mod


# --------------------------------------------------------------------------- the app


def _web_asset(name: str) -> bytes:
    from importlib.resources import files

    return (files("imgclf.serve") / "web" / name).read_bytes()


class _SecurityHeaders:
    """Pure ASGI middleware (does not buffer bodies): hardening headers on every answer."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for k, v in ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")):
                    if k not in names:
                        headers.append((k, v))
                if scope.get("path", "").startswith("/v1/") and b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(model, config: ServeConfig | None = None, *, bundle_dir: str | os.PathLike | None = None, explain=None, weights=None, cache_dir=None):
    """The FastAPI app around ``model`` (an :class:`~imgclf.export.onnx.OnnxClassifier` or
    :class:`~imgclf.export.onnx.TorchClassifier`). ``explain``: the Grad-CAM module to use
    (default: :func:`explain_module`, only when ``bundle_dir`` is given); ``False`` = off."""
    import anyio
    from fastapi import Depends, FastAPI, Query, Request, Security
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from fastapi.security import APIKeyHeader
    from pydantic import BaseModel
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = (config or ServeConfig()).validate()
    prep = model.preprocessing
    info = model.info()
    if explain is None:
        explain = explain_module() if bundle_dir is not None else None
    elif explain is False:
        explain = None
    if explain is not None and bundle_dir is None:
        explain = None
    batcher = MicroBatcher(model.predict_proba_arrays, max_batch=config.max_batch, wait_ms=config.batch_wait_ms)
    decode_limiter = anyio.CapacityLimiter(config.decode_threads)
    web = {name: _web_asset(name) for name in WEB_FILES}
    started = time.time()

    class ErrorBody(BaseModel):
        code: str
        message: str

    class ErrorResponse(BaseModel):
        error: ErrorBody

    class Prediction(BaseModel):
        filename: str
        format: str
        width: int
        height: int
        predicted: str
        probability: float
        probabilities: dict[str, float]

    class PredictResponse(BaseModel):
        model_id: str
        engine: str
        class_names: list[str]
        threshold: float | None
        positive_class: str | None
        decision: str
        predictions: list[Prediction]

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()
        if explain_state.get("executor") is not None:
            explain_state["executor"].shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="imgclf",
        version=__version__,
        summary=f"Image classifier {info['model_id']}: {', '.join(info['class_names'])}",
        description=(
            f"Classes: {', '.join(info['class_names'])}. Engine: {info['engine']}. Images are sent as multipart field `file` "
            f"({SUPPORTED_TYPES}; at most {config.max_upload_mb:g} MB and {config.max_pixels:,} pixels each, {config.max_files} per request)."
            + (f" Requests need the `{API_KEY_HEADER}` header." if config.api_key else "")
        ),
        lifespan=lifespan,
    )
    app.add_middleware(_SecurityHeaders)
    app.state.batcher = batcher
    app.state.explain = explain is not None

    def error_json(status: int, code: str, message: str, headers=None):
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_json(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return error_json(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error_json(422, "invalid-request", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _internal_error(request, exc):
        log.error("internal error on %s: %s: %s", request.url.path, type(exc).__name__, exc)
        return error_json(500, "internal", "internal server error; see the server log")

    key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="needed when the server was started with --api-key")
    expected = config.api_key.encode("utf-8") if config.api_key else None

    async def check_key(key: str | None = Security(key_header)):
        if expected is None:
            return
        if not key:
            raise ApiError(401, "missing-api-key", f"this server needs an API key in the {API_KEY_HEADER} header", {"WWW-Authenticate": "ApiKey"})
        try:
            provided = key.encode("latin-1")  # the header's raw bytes (HTTP headers arrive latin-1 decoded)
        except UnicodeEncodeError:
            provided = b""
        if not hmac.compare_digest(provided, expected):
            raise ApiError(401, "wrong-api-key", f"wrong API key in the {API_KEY_HEADER} header", {"WWW-Authenticate": "ApiKey"})

    errors_doc = {s: {"model": ErrorResponse, "description": d} for s, d in (
        (400, "no file, empty file or malformed multipart body"), (401, "missing or wrong API key"),
        (413, "file, request or pixel count over the limit"), (415, "not a supported image type / not multipart"),
        (422, "truncated or corrupt image"),
    )}

    def multipart_doc(many: bool, extra: dict | None = None) -> dict:
        file_schema = {"type": "string", "format": "binary"}
        props = {"file": {"type": "array", "items": file_schema} if many else file_schema}
        return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {"type": "object", "properties": {**props, **(extra or {})}, "required": ["file"]}}}}}

    async def _decode_all(uploads: list[Upload], keep_image: bool = False) -> list[DecodedUpload]:
        """Decode a request's files in parallel (up to the decode limiter's threads), in order."""
        return list(await asyncio.gather(*(
            anyio.to_thread.run_sync(decode_upload, up.data, up.filename, prep, config.max_pixels, keep_image, limiter=decode_limiter)
            for up in uploads
        )))

    def _files(parts: list[Upload]) -> list[Upload]:
        files = [p for p in parts if p.field == "file"]
        if not files:
            raise ApiError(400, "no-file", "no image in the request: send it as multipart form field 'file'")
        return files

    decision = model.decision
    names = list(model.class_names_)

    @app.post("/v1/predict", response_model=PredictResponse, responses=errors_doc, dependencies=[Depends(check_key)], openapi_extra=multipart_doc(True), summary="Classify one or more images")
    async def predict(request: Request):
        files = _files(await read_multipart(request, config))
        decoded = await _decode_all(files)
        probs = await batcher.submit(np.stack([d.array for d in decoded]))
        idx = decision.indices(probs)
        th = decision.to_dict()
        return {
            "model_id": info["model_id"],
            "engine": info["engine"],
            "class_names": names,
            "threshold": th["value"] if th else None,
            "positive_class": th["positive_class"] if th else None,
            "decision": decision.description,
            "predictions": [
                {
                    "filename": d.filename, "format": d.format, "width": d.width, "height": d.height,
                    "predicted": names[int(k)], "probability": float(row[int(k)]),
                    "probabilities": {c: float(v) for c, v in zip(names, row)},
                }
                for d, row, k in zip(decoded, probs, idx)
            ],
        }

    @app.get("/v1/model", dependencies=[Depends(check_key)], responses={401: errors_doc[401]}, summary="Model metadata and server limits")
    async def model_info():
        return {
            **info,
            "imgclf_version": __version__,
            "explain": explain is not None,
            "limits": {
                "max_upload_mb": config.max_upload_mb, "max_pixels": config.max_pixels, "max_files": config.max_files,
                "max_batch": config.max_batch, "batch_wait_ms": config.batch_wait_ms, "types": SUPPORTED_TYPES,
            },
            "api_key_required": expected is not None,
            "stats": {
                "requests": batcher.requests,
                "batches": batcher.batches,
                "images": batcher.images,
                "mean_batch": round(batcher.images / batcher.batches, 2) if batcher.batches else None,
            },
        }

    @app.get("/healthz", summary="Liveness")
    async def healthz():
        return {"status": "ok", "uptime_s": round(time.time() - started, 1)}

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(web["index.html"], headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in WEB_FILES or name == "index.html":
            raise ApiError(404, "not-found", "no such file")
        return Response(web[name], media_type=WEB_FILES[name], headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    explain_state: dict = {}
    if explain is not None:
        # one worker: Grad-CAM runs one at a time, on its own model copy (hooks and
        # gradients must not meet the predict path's concurrent forwards)
        explain_state["executor"] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgclf-explain")

        def _explainer():
            if "clf" not in explain_state:
                from imgclf.model.classifier import Classifier

                explain_state["clf"] = Classifier.load(bundle_dir, weights=weights, cache_dir=cache_dir, engine="torch", precision="fp32", use_cache=False)
            return explain_state["clf"]

        def _explain(image, class_name):
            clf = _explainer()
            heat, k, prob = explain.gradcam(clf, image, class_name)
            crop = explain.model_input_image(clf, image) if hasattr(explain, "model_input_image") else image
            buf = io.BytesIO()
            explain.overlay(crop, heat).save(buf, format="PNG")
            return buf.getvalue(), clf.class_names_[int(k)], float(prob)

        @app.post(
            "/v1/explain", dependencies=[Depends(check_key)], responses={200: {"content": {"image/png": {}}, "description": "Grad-CAM overlay on the model's input crop"}, **errors_doc},
            openapi_extra=multipart_doc(False), response_class=Response, summary="Grad-CAM overlay PNG for one image",
        )
        async def explain_endpoint(request: Request, class_name: str | None = Query(None, description="class to explain (default: the predicted one)")):
            if class_name is not None and class_name not in names:
                raise ApiError(400, "unknown-class", f"class_name {class_name!r} is not a class of this model ({', '.join(names)})")
            files = _files(await read_multipart(request, config))
            if len(files) != 1:
                raise ApiError(400, "one-file", "send exactly one image to /v1/explain")
            (dec,) = await _decode_all(files, keep_image=True)
            try:
                png, cls, prob = await asyncio.get_running_loop().run_in_executor(explain_state["executor"], _explain, dec.image, class_name)
            except ValueError as e:
                raise ApiError(400, "cannot-explain", str(e).splitlines()[0] if str(e) else "cannot explain this image") from None
            return Response(png, media_type="image/png", headers={"X-Class": cls, "X-Probability": f"{prob:.6f}", "Access-Control-Expose-Headers": "X-Class, X-Probability"})

    return app


# --------------------------------------------------------------------------- running


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn so a taken port is a one-line error (and port 0 works)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: must be 0..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve ({e.strerror or e})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(model, *, host: str = "127.0.0.1", port: int = 8000, config: ServeConfig | None = None, engine: str = "auto", weights=None, cache_dir=None, log_level: str = "info", announce=print, explain: bool = True) -> None:
    """Load the model, bind, and run uvicorn until interrupted."""
    import uvicorn

    config = (config or ServeConfig()).validate()
    if not is_loopback(host) and not config.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this machine can use the model", host)
    sock = bind_socket(host, port)  # fail fast on a taken port, before loading anything
    try:
        clf, bundle = load_serving_model(model, engine, weights=weights, cache_dir=cache_dir)
        app = create_app(clf, config, bundle_dir=bundle, explain=None if explain else False, weights=weights, cache_dir=cache_dir)
        actual = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        announce(
            f"imgclf: serving {model} (model {clf.model_id}, {clf.engine}, classes {', '.join(clf.class_names_)}) "
            f"on http://{shown}:{actual}/ (API docs /docs){'; Grad-CAM at /v1/explain' if app.state.explain else ''}"
            f"{'; API key required' if config.api_key else ''}; Ctrl+C stops"
        )
        ucfg = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("debug", "info"), limit_concurrency=max(64, 4 * config.max_batch), timeout_keep_alive=5, server_header=False)
        uvicorn.Server(ucfg).run(sockets=[sock])
    finally:
        sock.close()
