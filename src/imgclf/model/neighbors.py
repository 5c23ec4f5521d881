"""Similar cases: the training images nearest to an image in the model's own feature space.

A :class:`NeighborIndex` holds, for the (possibly subsampled) training images, their
L2-normalised backbone features (the ones predict computes: same preprocessing, same
possibly fine-tuned backbone, plain view), their paths and labels, and a small JPEG
thumbnail of each so that a report or a server can show the cases without the dataset.

On disk it is part of the bundle, beside ``model.safetensors``:

* ``neighbors.safetensors`` — ``features`` (n, D) float16, ``labels`` (n,) int64,
  ``thumbnails`` (all JPEG bytes, concatenated, uint8) and ``thumbnail_offsets`` (n + 1,) int64;
* ``neighbors.json`` — format, class names, paths, thumbnail size, how many training images
  there were and how the stored ones were chosen.

``model.json`` records both files' sha256 (:meth:`NeighborIndex.save` returns that entry);
:meth:`NeighborIndex.load` refuses a file whose hash differs. Cosine similarity is the dot
product of normalised vectors. Up to :data:`EXACT_SEARCH_MAX` stored images the search is
exact (one matrix product + ``argpartition``); above it a faiss IVF index (inner product)
is built in memory on first use, since one exact query then reads the whole matrix
(benchmarks/README.md, "Similar cases", has the measurements behind the crossover).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf.config import layout
from imgclf.data.imaging import load_rgb
from imgclf.fileio import atomic_write_bytes, file_sha256
from imgclf.model.metadata import BundleError

log = logging.getLogger("imgclf")

NEIGHBORS_FORMAT = "imgclf-neighbors/1"
EXACT_SEARCH_MAX = 50_000  # stored vectors up to which search is exact; above, faiss IVF (see the module docstring)
THUMBNAIL_QUALITY = 80  # JPEG quality of the stored thumbnails


@dataclass(frozen=True)
class Neighbor:
    """One similar training image: its path when training, its label, cosine similarity in
    [-1, 1] and its row in the index (for :meth:`NeighborIndex.thumbnail`)."""

    path: str
    label: str
    similarity: float
    index: int

    def to_dict(self) -> dict:
        return {"path": self.path, "label": self.label, "similarity": self.similarity, "index": self.index}


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32); an all-zero row stays zero."""
    x = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def exact_search(base: np.ndarray, queries: np.ndarray, k: int, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``base`` by dot product for each query: (similarities, indices), each
    (m, k), best first. Queries go in chunks so the (chunk, n) score matrix stays bounded
    (default: up to 256 queries and about 2·10^7 scores a chunk)."""
    n, m = len(base), len(queries)
    k = min(k, n)
    chunk = chunk or max(1, min(256, 20_000_000 // max(n, 1)))
    sims = np.zeros((m, k), np.float32)
    idx = np.zeros((m, k), np.int64)
    for start in range(0, m, chunk):
        scores = queries[start:start + chunk] @ base.T
        if k < n:
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(n), (len(scores), n))
        top_scores = np.take_along_axis(scores, top, 1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        idx[start:start + chunk] = np.take_along_axis(top, order, 1)
        sims[start:start + chunk] = np.take_along_axis(top_scores, order, 1)
    return sims, idx


class AnnSearch:
    """faiss IVF-Flat on inner product over normalised vectors: ``nlist`` ≈ √n cells, the
    ``nprobe`` nearest cells searched per query (recall@5 vs exact in benchmarks/README.md)."""

    def __init__(self, base: np.ndarray, *, seed: int = 0, nprobe: int | None = None):
        try:
            import faiss
        except ImportError:
            raise BundleError("the similar-cases index is larger than exact search handles and faiss is not installed (pip install faiss-cpu)") from None
        t0 = time.perf_counter()
        n, dim = base.shape
        self.nlist = max(1, min(int(np.sqrt(n)), n // 39))  # faiss wants >= 39 training points per cell
        self.nprobe = nprobe or max(1, self.nlist // 16)
        quantizer = faiss.IndexFlatIP(dim)
        self.index = faiss.IndexIVFFlat(quantizer, dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = base if n <= 64 * self.nlist else base[np.sort(rng.choice(n, 64 * self.nlist, replace=False))]  # k-means on a sample
        self.index.cp.seed = seed
        self.index.train(np.ascontiguousarray(train, dtype=np.float32))
        self.index.add(np.ascontiguousarray(base, dtype=np.float32))
        self.index.nprobe = self.nprobe
        self.build_seconds = time.perf_counter() - t0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return sims.astype(np.float32), idx.astype(np.int64)


def stratified_subsample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted row indices of at most ``limit`` rows keeping each class's share (every class
    present keeps at least one row), chosen with ``seed``."""
    n = len(labels)
    if n <= limit:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.maximum(1, np.floor(counts * limit / n).astype(np.int64))
    while quota.sum() > limit:  # the per-class minimum of one can overshoot
        quota[np.argmax(quota)] -= 1
    spare = limit - quota.sum()
    for c in np.argsort(-(counts * limit / n - quota), kind="stable")[:spare]:
        quota[c] += 1
    keep = [rng.choice(np.flatnonzero(labels == c), int(q), replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(keep))


def choose_cases(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Rows of the training images to store: all, or above ``limit`` a stratified sample of
    ``limit`` chosen with ``seed`` (logged as a warning, since some cases then go unseen)."""
    keep = stratified_subsample(np.asarray(labels), limit, seed)
    if len(keep) < len(labels):
        log.warning("similar cases: %d training images exceed neighbors_max %d; storing a stratified sample of %d (seed %d)",
                    len(labels), limit, len(keep), seed)
    return keep


def make_thumbnail(path: str, px: int) -> bytes:
    """JPEG bytes of the image at ``path`` fitted into px×px (aspect kept); b"" if unreadable."""
    try:
        img = load_rgb(path, draft_size=2 * px)
        img.thumbnail((px, px))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=THUMBNAIL_QUALITY)
        return buf.getvalue()
    except Exception as e:  # noqa: BLE001 - a file gone since its features were computed: no picture, still a neighbour
        log.warning("similar cases: no thumbnail for %s (%s)", path, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return b""


class NeighborIndex:
    """The stored training cases and the search over them (see the module docstring)."""

    def __init__(self, features: np.ndarray, labels: Sequence[int], paths: Sequence[str], class_names: Sequence[str],
                 thumbnails: Sequence[bytes], *, thumbnail_px: int, training_images: int | None = None, seed: int = 0):
        self.features = normalise(features)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.paths = [str(p) for p in paths]
        self.class_names = list(class_names)
        self.thumbnails = list(thumbnails)
        self.thumbnail_px = int(thumbnail_px)
        self.training_images = len(self.paths) if training_images is None else int(training_images)
        self.seed = seed
        n = len(self.features)
        if not (len(self.labels) == len(self.paths) == len(self.thumbnails) == n):
            raise BundleError(f"similar-cases index: {n} features, {len(self.labels)} labels, {len(self.paths)} paths and {len(self.thumbnails)} thumbnails do not agree")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise BundleError("similar-cases index: a label is outside the class list")
        self._ann: AnnSearch | None = None

    # ------------------------------------------------------------------ build

    @classmethod
    def build(cls, features: np.ndarray, labels: Sequence[int], paths: Sequence[str], class_names: Sequence[str], *,
              thumbnail_px: int = 64, training_images: int | None = None, seed: int = 0, threads: int = 4) -> "NeighborIndex":
        """From the chosen training images' features (:func:`choose_cases`), with their
        thumbnails made now (decoded in ``threads`` threads); ``training_images``: how many
        there were before choosing."""
        paths = [str(p) for p in paths]
        t0 = time.perf_counter()
        if thumbnail_px > 0:
            with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
                thumbs = list(pool.map(lambda p: make_thumbnail(p, thumbnail_px), paths))
        else:
            thumbs = [b""] * len(paths)
        index = cls(features, labels, paths, class_names, thumbs, thumbnail_px=thumbnail_px, training_images=training_images, seed=seed)
        log.info("similar cases: %d training images indexed (%.1f MB with %d px thumbnails) in %.1f s",
                 len(index), index.nbytes / 1e6, thumbnail_px, time.perf_counter() - t0)
        return index

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1]) if self.features.ndim == 2 else 0

    @property
    def nbytes(self) -> int:
        """Approximate size on disk: float16 features, labels, thumbnails (paths not counted)."""
        return len(self) * (2 * self.dim + 8) + sum(len(t) for t in self.thumbnails)

    # ------------------------------------------------------------------ search

    @property
    def method(self) -> str:
        return "exact" if len(self) <= EXACT_SEARCH_MAX else "faiss-ivf"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, row indices), each (m, min(k, n)), best first, for raw (unnormalised)
        query features; exact up to :data:`EXACT_SEARCH_MAX` stored rows, faiss IVF above."""
        if k < 1:
            raise ValueError(f"the number of neighbours must be >= 1, got {k}")
        q = normalise(np.atleast_2d(queries))
        if q.shape[1] != self.dim:
            raise ValueError(f"query features have {q.shape[1]} dimensions, the similar-cases index {self.dim}")
        k = min(k, len(self))
        if self.method == "exact":
            return exact_search(self.features, q, k)
        if self._ann is None:
            log.info("similar cases: building the faiss IVF index over %d vectors (once per loaded model)", len(self))
            self._ann = AnnSearch(self.features, seed=self.seed)
            log.info("similar cases: faiss index built in %.1f s (%d cells, %d probed)", self._ann.build_seconds, self._ann.nlist, self._ann.nprobe)
        return self._ann.search(q, k)

    def neighbors(self, queries: np.ndarray, k: int) -> list[list[Neighbor]]:
        """The ``k`` most similar training cases of each query row, best first."""
        sims, idx = self.search(queries, k)
        return [[Neighbor(self.paths[j], self.class_names[self.labels[j]], round(float(s), 6), int(j)) for s, j in zip(srow, irow) if j >= 0]
                for srow, irow in zip(sims, idx)]

    def thumbnail(self, i: int) -> bytes:
        """JPEG bytes of stored case ``i`` (b"" when its image could not be read at training)."""
        return self.thumbnails[i]

    # ------------------------------------------------------------------ files

    def save(self, directory: str | os.PathLike) -> dict:
        """Write both files atomically; returns model.json's ``neighbors`` entry (hashes, sizes)."""
        from safetensors.numpy import save

        directory = Path(directory)
        offsets = np.zeros(len(self) + 1, np.int64)
        offsets[1:] = np.cumsum([len(t) for t in self.thumbnails])
        blob = np.frombuffer(b"".join(self.thumbnails), dtype=np.uint8) if offsets[-1] else np.zeros(0, np.uint8)
        tensors = {
            "features": np.ascontiguousarray(self.features.astype(np.float16)),
            "labels": self.labels,
            "thumbnail_offsets": offsets,
            "thumbnails": blob,
        }
        data = save(tensors, metadata={"format": NEIGHBORS_FORMAT})
        info = {
            "format": NEIGHBORS_FORMAT, "count": len(self), "training_images": self.training_images, "dim": self.dim,
            "thumbnail_px": self.thumbnail_px, "seed": self.seed, "class_names": self.class_names, "paths": self.paths,
        }
        text = (json.dumps(info, indent=1) + "\n").encode("utf-8", "surrogateescape")
        atomic_write_bytes(directory / layout.NEIGHBORS_TENSORS, data)
        atomic_write_bytes(directory / layout.NEIGHBORS_META, text)
        return {
            "count": len(self), "training_images": self.training_images, "thumbnail_px": self.thumbnail_px, "bytes": len(data) + len(text),
            "files": {layout.NEIGHBORS_TENSORS: file_sha256(directory / layout.NEIGHBORS_TENSORS),
                      layout.NEIGHBORS_META: file_sha256(directory / layout.NEIGHBORS_META)},
        }

    @classmethod
    def load(cls, directory: str | os.PathLike, entry: dict, class_names: Sequence[str]) -> "NeighborIndex":
        """Read the index of the bundle in ``directory`` after checking each file's sha256
        against ``entry`` (model.json's ``neighbors``); :class:`BundleError` (one line) otherwise."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        directory = Path(directory)
        files = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(files, dict) or set(files) != {layout.NEIGHBORS_TENSORS, layout.NEIGHBORS_META}:
            raise BundleError(f"{directory / layout.MODEL_META}: its neighbors entry does not list {layout.NEIGHBORS_TENSORS} and {layout.NEIGHBORS_META} with their sha256")
        contents = {}  # each file read once: the bytes checked are the bytes parsed
        for name, digest in files.items():
            p = directory / name
            if not p.is_file():
                raise BundleError(f"{p}: missing, but model.json says the model has a similar-cases index")
            try:
                contents[name] = p.read_bytes()
            except OSError as e:
                raise BundleError(f"{p}: unreadable ({e.strerror or e})") from None
            if hashlib.sha256(contents[name]).hexdigest() != digest:
                raise BundleError(f"{p}: its sha256 differs from the one in model.json (the file was damaged or modified); refusing to use it")
        try:
            info = json.loads(contents[layout.NEIGHBORS_META].decode("utf-8", "surrogateescape"))
            tensors = load(contents[layout.NEIGHBORS_TENSORS])
        except (SafetensorError, OSError, ValueError) as e:
            raise BundleError(f"{directory}: similar-cases index unreadable ({' '.join(str(e).split())})") from None
        if not isinstance(info, dict) or info.get("format") != NEIGHBORS_FORMAT or list(info.get("class_names", [])) != list(class_names):
            raise BundleError(f"{directory / layout.NEIGHBORS_META}: not an {NEIGHBORS_FORMAT} file of this model's classes")
        if {"features", "labels", "thumbnail_offsets", "thumbnails"} - set(tensors):
            raise BundleError(f"{directory / layout.NEIGHBORS_TENSORS}: tensors missing")
        offsets, blob = tensors["thumbnail_offsets"], tensors["thumbnails"].tobytes()
        thumbs = [blob[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        return cls(tensors["features"].astype(np.float32), tensors["labels"], info.get("paths", []), class_names, thumbs,
                   thumbnail_px=info.get("thumbnail_px", 0), training_images=info.get("training_images"), seed=info.get("seed", 0))


def remove_index_files(directory: str | os.PathLike) -> None:
    """Delete a previous save's index files, so a bundle saved without an index holds none."""
    for name in (layout.NEIGHBORS_TENSORS, layout.NEIGHBORS_META):
        (Path(directory) / name).unlink(missing_ok=True)
