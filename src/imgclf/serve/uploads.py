"""Uploads, from bytes on the wire to model input: the multipart body is parsed in memory
with every limit enforced as bytes arrive, the image type is sniffed from the content, the
pixel count is checked from the header, and only then is the image decoded."""

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from imgclf.data.imaging import ImageDecodeError, decode_image_bytes
from imgclf.data.preprocess import draft_size, image_to_array
from imgclf.serve.config import MB, ServeConfig
from imgclf.serve.errors import ApiError

SUPPORTED_TYPES = "JPEG, PNG, GIF, BMP, TIFF or WebP"


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


DECODE_ERROR_STATUS = {  # ImageDecodeError.kind → (HTTP status, error code)
    "zero-byte": (400, "empty-file"),
    "not-an-image": (415, "not-an-image"),
    "truncated": (422, "truncated-image"),
    "too-large": (413, "too-many-pixels"),
    "unreadable": (422, "unreadable-image"),
}


def decode_upload(data: bytes, filename: str, prep, max_pixels: int, keep_image: bool = False) -> DecodedUpload:
    """Sniff, check the pixel count from the header, decode as imgclf always does, resize/crop."""
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
        status, code = DECODE_ERROR_STATUS.get(e.kind, (422, "unreadable-image"))
        raise ApiError(status, code, f"upload {e}") from None
    if decoded.format != kind:
        raise ApiError(415, "not-an-image", f"upload {filename!r}: content looks like {kind} but decodes as {decoded.format}")
    try:
        arr = image_to_array(decoded.image, prep)
    except Exception as e:  # noqa: BLE001
        raise ApiError(422, "unreadable-image", f"upload {filename!r}: cannot prepare the image ({type(e).__name__})") from None
    return DecodedUpload(filename, kind, w, h, arr, decoded.image if keep_image else None)
