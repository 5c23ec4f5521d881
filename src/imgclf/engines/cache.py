"""The on-disk feature cache and the one builder of its keys, so a key made for one
purpose can never drift from the same key made for another and orphan existing caches.

Each image's pooled feature vector is stored under a key made of backbone + weights
identity + preprocessing + precision (the directory) and the image's content hash (the
file), so a second ``train`` with other head settings does no backbone work at all.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from pathlib import Path

import numpy as np

from imgclf.fileio import atomic_write_bytes

log = logging.getLogger("imgclf")

_MAGIC = b"IMGCLF-F1"


def cache_key(backbone: str, fingerprint: str, *qualifiers: str, transform=None) -> str:
    """``<backbone>-<fingerprint>[-<qualifier>...][-<transform digest>]``.

    Names the feature-cache folders (qualified by precision and, for augmented or
    test-time views, the view's ``key``) and the backbone's exported ONNX files.
    ``fingerprint`` is the runner's: weights, preprocessing and any fine-tuned tensors.
    """
    parts = [backbone.replace(":", "_"), fingerprint, *qualifiers]
    if transform is not None:
        parts.append(hashlib.sha256(transform.key.encode()).hexdigest()[:16])
    return "-".join(parts)


class ChecksummedFileCache:
    """One small file per content hash: ``header + blake2b-16(payload) + payload``, validated on read.

    A truncated, corrupt or foreign file is detected (header, length and a checksum of the
    payload), deleted, and reported as a miss so it is recomputed. Writes are atomic.
    """

    def __init__(self, folder: Path, header: bytes, payload_bytes: int, suffix: str, what: str):
        self.dir = folder
        self.header = header
        self.payload_bytes = payload_bytes
        self.suffix = suffix
        self.what = what

    def _path(self, h: str) -> Path:
        return self.dir / h[:2] / f"{h}{self.suffix}"

    def get_payload(self, h: str) -> bytes | None:
        p = self._path(h)
        try:
            raw = p.read_bytes()
        except OSError:
            return None
        n = len(self.header)
        payload = raw[n + 16:]
        if raw[:n] != self.header or len(payload) != self.payload_bytes or hashlib.blake2b(payload, digest_size=16).digest() != raw[n:n + 16]:
            log.warning("%s: corrupt entry %s, recomputing", self.what, p)
            try:
                p.unlink()
            except OSError:
                pass
            return None
        return payload

    def put_payload(self, h: str, payload: bytes) -> None:
        if len(payload) != self.payload_bytes:
            raise ValueError(f"{self.what}: {len(payload)} bytes do not match the entry size {self.payload_bytes}")
        atomic_write_bytes(self._path(h), self.header + hashlib.blake2b(payload, digest_size=16).digest() + payload)


class FeatureCache(ChecksummedFileCache):
    """Pooled feature vectors (float32), one file per (feature key, image content hash)."""

    def __init__(self, root: str | os.PathLike, key: str, dim: int):
        super().__init__(Path(root) / "features" / key, _MAGIC + struct.pack("<I", dim), 4 * dim, ".f32", "feature cache")
        self.dim = dim

    def get(self, h: str) -> np.ndarray | None:
        payload = self.get_payload(h)
        return None if payload is None else np.frombuffer(payload, dtype="<f4").copy()

    def put(self, h: str, vec: np.ndarray) -> None:
        if vec.size != self.dim:
            raise ValueError(f"feature of size {vec.size} does not match cache dimension {self.dim}")
        self.put_payload(h, np.ascontiguousarray(vec, dtype="<f4").tobytes())
