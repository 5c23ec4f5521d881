"""Atomic writes, file hashes and shared paths: shared by every module that writes or fingerprints files.

Torch-free on purpose, so ONNX-only clients (export, serving) can use it cheaply.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: readers never see a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _digest(path: str | os.PathLike, h) -> str:
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    return _digest(path, hashlib.sha256())


def content_hash(path: str | os.PathLike) -> str:
    """Hash of the file's bytes: the same picture under another name shares its features."""
    return _digest(path, hashlib.blake2b(digest_size=20))


def default_cache_dir() -> Path:
    """Feature cache, backbone and export cache: $IMGCLF_CACHE_DIR, else the XDG cache."""
    env = os.environ.get("IMGCLF_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgclf"


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Is ``path`` ``folder`` or below it (both resolved)?"""
    try:
        Path(path).resolve().relative_to(Path(folder).resolve())
        return True
    except ValueError:
        return False


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def write_csv(path: Path, rows: list[dict], fieldnames: list[str] | None = None) -> None:
    buf = io.StringIO()
    fieldnames = fieldnames or (list(rows[0]) if rows else [])
    w = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(Path(path), buf.getvalue().encode())


def csv_text(rows: list[dict], fieldnames: list[str] | None = None) -> str:
    buf = io.StringIO()
    fieldnames = fieldnames or (list(rows[0]) if rows else [])
    w = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
