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
_HEADER = struct.Struct("<9sI16s")  # magic, dim, blake2b-16 digest of the payload


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


class FeatureCache:
    """One small file per (feature key, image content hash), validated on read.

    A truncated, corrupt or foreign file is detected (length, magic, dimension and a
    checksum of the payload), deleted, and reported as a miss so it is recomputed.
    """

    def __init__(self, root: str | os.PathLike, key: str, dim: int):
        self.dir = Path(root) / "features" / key
        self.dim = dim

    def _path(self, h: str) -> Path:
        return self.dir / h[:2] / f"{h}.f32"

    def get(self, h: str) -> np.ndarray | None:
        p = self._path(h)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError:
            return None
        payload = raw[_HEADER.size:]
        try:
            magic, dim, digest = _HEADER.unpack_from(raw)
        except struct.error:
            magic, dim, digest = b"", -1, b""
        if (
            magic != _MAGIC
            or dim != self.dim
            or len(payload) != 4 * self.dim
            or hashlib.blake2b(payload, digest_size=16).digest() != digest
        ):
            log.warning("feature cache: corrupt entry %s, recomputing", p)
            try:
                p.unlink()
            except OSError:
                pass
            return None
        return np.frombuffer(payload, dtype="<f4").copy()

    def put(self, h: str, vec: np.ndarray) -> None:
        payload = np.ascontiguousarray(vec, dtype="<f4").tobytes()
        if len(payload) != 4 * self.dim:
            raise ValueError(f"feature of size {vec.size} does not match cache dimension {self.dim}")
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        atomic_write_bytes(self._path(h), _HEADER.pack(_MAGIC, self.dim, digest) + payload)
