"""Decode any supported image file to an 8-bit RGB ``PIL.Image`` in one documented way.

Training, evaluation, inspection and prediction all decode through this module so
that a given file always yields the same pixels, whichever command reads it.

Rules
-----
* Formats: JPEG, PNG, BMP, GIF (first frame only), TIFF, WebP (see
  ``IMAGE_EXTENSIONS``). Anything else Pillow can identify is decoded too, but
  folders are only scanned for these extensions.
* The EXIF orientation tag is applied (``ImageOps.exif_transpose``), so a
  phone photo comes back the way it is displayed. A malformed EXIF block is
  ignored (the image is kept unrotated) rather than making the image unusable.
* Transparency (RGBA, LA, PA, P or L/RGB with a ``transparency`` key) is alpha
  composited over a WHITE background: models never see the arbitrary colour
  hidden under fully transparent pixels.
* Grayscale ``L`` / bilevel ``1`` are replicated to three channels.
* CMYK (and YCbCr etc.) go through Pillow's own ``convert("RGB")``.
* 16-bit (``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` and ``I`` as produced from
  16-bit PNG/TIFF) is SCALED, not clipped: ``round(value / 257)``, so
  0..65535 maps onto 0..255 and a 16-bit scan keeps its contrast. ``I`` values
  outside 0..65535 are clipped after scaling.
* Float ``F``: if the maximum is <= 1.0 the image is taken as 0..1 and scaled
  by 255; otherwise values are clipped to 0..255. NaN becomes 0.
* The pixels are fully loaded (``.load()``) inside the call so that a truncated
  file fails here, with a clear error, and not later inside a data loader.
* Pillow's decompression-bomb guard stays ON (``Image.MAX_IMAGE_PIXELS`` is
  never changed here): an image over twice that limit raises
  ``ImageDecodeError(kind="too-large")``; one between 1x and 2x only gets
  Pillow's ``DecompressionBombWarning``, as Pillow itself does.
* Files are opened read-only; nothing is ever written.
* Every failure is an ``ImageDecodeError`` (a ``ValueError``) whose ``str`` is a
  single line ``"<path>: <reason>"`` and whose ``kind`` is one of
  ``zero-byte``, ``not-an-image``, ``truncated``, ``too-large``, ``unreadable``.
  No raw Pillow/OS exception escapes, so callers can report and skip.
* ``draft_size``: for JPEG only, ``img.draft("RGB", (s, s))`` is called before
  loading. libjpeg then decodes at 1/2, 1/4 or 1/8 scale, never below the
  requested size, which makes big photos much cheaper when they are going to
  be resized to a small model input anyway.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "DecodedImage",
    "is_image_file",
    "load_rgb",
    "load_rgb_bytes",
    "decode_image",
    "decode_image_bytes",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
)

ERROR_KINDS = ("zero-byte", "not-an-image", "truncated", "too-large", "unreadable")

_WHITE = (255, 255, 255)
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class ImageDecodeError(ValueError):
    """An image could not be decoded; one line, with a machine-readable ``kind``.

    ``kind`` lets callers count problems by category (inspect) or decide to skip
    a file (predict) without parsing messages.
    """

    def __init__(self, path: str, reason: str, kind: str):
        path = str(path)
        reason = " ".join(str(reason).split()) or "unknown error"
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown ImageDecodeError kind {kind!r}")
        super().__init__(path, reason, kind)  # args kept so the error pickles
        self.path = path
        self.reason = reason
        self.kind = kind

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class DecodedImage:
    """RGB image plus what the file originally was (for dataset statistics)."""

    image: Image.Image
    format: str | None  # Pillow format name, e.g. "JPEG"; None if unknown
    mode: str  # mode as stored in the file, before conversion, e.g. "I;16"


def is_image_file(path: str | os.PathLike) -> bool:
    """True for non-hidden names with an image extension (case-insensitive).

    Decided by name only (no stat, no decode), so folder scans stay cheap;
    hidden files (``.DS_Store``, ``._photo.jpg`` AppleDouble files) are never images.
    """
    name = Path(path).name
    if not name or name.startswith("."):
        return False
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def load_rgb(path: str | os.PathLike, *, draft_size: int | None = None) -> Image.Image:
    """Decode the file at ``path`` to an 8-bit RGB image (rules in the module docstring)."""
    return decode_image(path, draft_size=draft_size).image


def load_rgb_bytes(
    data: bytes, name: str = "<upload>", *, draft_size: int | None = None
) -> Image.Image:
    """Decode in-memory bytes (e.g. an HTTP upload); ``name`` is used in error messages."""
    return decode_image_bytes(data, name, draft_size=draft_size).image


def decode_image(path: str | os.PathLike, *, draft_size: int | None = None) -> DecodedImage:
    """Like ``load_rgb`` but also returns the original format and mode."""
    name = str(path)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise ImageDecodeError(name, _oserror_reason(exc), "unreadable") from None
    if size == 0:
        raise ImageDecodeError(name, "file is empty (0 bytes)", "zero-byte")
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise ImageDecodeError(name, _oserror_reason(exc), "unreadable") from None
    with fh:
        return _decode(fh, name, draft_size)


def decode_image_bytes(
    data: bytes, name: str = "<upload>", *, draft_size: int | None = None
) -> DecodedImage:
    """Like ``load_rgb_bytes`` but also returns the original format and mode."""
    if not data:
        raise ImageDecodeError(name, "file is empty (0 bytes)", "zero-byte")
    return _decode(io.BytesIO(bytes(data)), name, draft_size)


def _oserror_reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _bomb_reason(exc: Exception) -> str:
    """Say how big the image is and what Pillow's limit is, so the user can judge."""
    limit = Image.MAX_IMAGE_PIXELS
    match = re.search(r"\((\d+) pixels\)", str(exc))
    pixels = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
    if not limit:  # pragma: no cover - guard disabled by someone else
        return f"image too large: {pixels} ({exc})"
    return (
        f"image too large: {pixels} exceeds Pillow's decompression-bomb limit of "
        f"{2 * limit:,} pixels (2 x Image.MAX_IMAGE_PIXELS={limit:,})"
    )


def _decode(fp: BinaryIO, name: str, draft_size: int | None) -> DecodedImage:
    """Open, fully load, orient and convert; every failure becomes ImageDecodeError."""
    if draft_size is not None and (not isinstance(draft_size, int) or draft_size < 1):
        raise ValueError(f"draft_size must be a positive int or None, got {draft_size!r}")
    # Stage 1: identify the file.
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(name, _bomb_reason(exc), "too-large") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            name, "not an image Pillow can identify (wrong extension or corrupt header)", "not-an-image"
        ) from None
    except Exception as exc:  # noqa: BLE001 - the contract is: nothing raw escapes
        raise ImageDecodeError(name, _describe(exc), "unreadable") from None
    # Stage 2: decode every pixel now, so truncation shows up here.
    try:
        fmt = img.format
        if draft_size is not None and fmt == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        original_mode = img.mode
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(name, _bomb_reason(exc), "too-large") from None
    except OSError as exc:
        raise ImageDecodeError(name, f"truncated or corrupt image data ({_describe(exc)})", "truncated") from None
    except Exception as exc:  # noqa: BLE001
        raise ImageDecodeError(name, _describe(exc), "unreadable") from None
    # Stage 3: orientation and colour conversion (in memory only).
    try:
        try:
            oriented = ImageOps.exif_transpose(img)
        except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the picture
            oriented = img
        if oriented is None:  # pragma: no cover - only with in_place=True
            oriented = img
        rgb = _to_rgb(oriented)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(name, _bomb_reason(exc), "too-large") from None
    except Exception as exc:  # noqa: BLE001
        raise ImageDecodeError(name, f"cannot convert mode {img.mode} to RGB ({_describe(exc)})", "unreadable") from None
    return DecodedImage(image=rgb, format=fmt, mode=original_mode)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _to_rgb(img: Image.Image) -> Image.Image:
    """Apply the colour rules from the module docstring."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img.copy() if img.readonly else img
    if mode in _SIXTEEN_BIT_MODES or mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float64) / 257.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img).astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "P":
        # A palette may itself hold alpha (PNG tRNS is handled above; "PA"-like palettes here).
        if img.palette is not None and img.palette.mode == "RGBA":
            return _to_rgb(img.convert("RGBA"))
        return img.convert("RGB")
    return img.convert("RGB")
