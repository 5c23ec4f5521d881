"""Pooled backbone features for a list of image files: cache hits first, then the rest
decoded in a thread pool ahead of inference; bad files are reported, not fatal.

The recipe recomputed the frozen VGG-16 every epoch; here each image goes through the
backbone once per cache key.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from imgclf import distributed
from imgclf.data.preprocess import decode_array as _decode
from imgclf.data.preprocess import decoded_batches
from imgclf.engines.cache import FeatureCache
from imgclf.engines.runner import BackboneRunner
from imgclf.fileio import content_hash


@dataclass
class ExtractionResult:
    features: np.ndarray  # (n_ok, D) float32, rows in the order of ``ok_indices``
    ok_indices: list[int]
    errors: dict[int, str]  # index → one-line reason (decode failures etc.)
    computed: int = 0  # images that went through the backbone
    cached: int = 0
    seconds: float = 0.0
    engine: str = "cache"
    precision: str = ""

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 and self.computed else 0.0


def extract_features(
    paths: Sequence[str | os.PathLike],
    runner: BackboneRunner,
    *,
    use_cache: bool = True,
    batch_size: int = 32,
    decode_threads: int = 2,
    progress: Callable[[int], None] | None = None,
    transform=None,
    engine_factory: Callable[[], object] | None = None,
) -> ExtractionResult:
    """Pooled backbone features for ``paths``; bad files come back in ``errors``.

    ``transform`` (an augmented or test-time view with a ``key``) is applied to each
    decoded image before preprocessing; its key is part of the cache key.
    ``engine_factory`` makes the engine for the images not in the cache instead of the
    runner's; it must compute the runner's features (they are cached under its key). An
    engine with a ``record(keys)`` method gets each batch's content hashes right after the
    batch, so it can keep what it computed beside the features (stage 2's prefix activations).
    """
    prep = runner.spec.preprocessing
    dim = runner.spec.feature_dim
    cache = FeatureCache(runner.cache_root, runner.cache_key(transform), dim) if use_cache else None
    n = len(paths)
    feats: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    hashes: dict[int, str] = {}

    with ThreadPoolExecutor(max_workers=distributed.decode_threads(decode_threads)) as pool:
        def _hash(i):
            try:
                return i, content_hash(paths[i]), None
            except OSError as e:
                return i, None, f"{paths[i]}: cannot read ({e.strerror or e})"

        # content hashes key the cache and seed augmented views; plain uncached runs skip them
        need_hash = cache is not None or transform is not None
        for i, h, err in (pool.map(_hash, range(n)) if need_hash else ((i, "", None) for i in range(n))):
            if err:
                errors[i] = err
            else:
                hashes[i] = h
        todo = []
        for i, h in hashes.items():
            vec = cache.get(h) if cache else None
            if vec is not None:
                feats[i] = vec
            else:
                todo.append(i)
        cached = len(feats)
        if progress and cached:
            progress(cached)

        t0 = time.perf_counter()
        engine_name, precision = "cache", runner.precision
        if todo:
            engine = engine_factory() if engine_factory is not None else runner.get()
            engine_name, precision = engine.name, engine.precision
            record = getattr(engine, "record", None)
            t0 = time.perf_counter()
            decode = lambda i: _decode(str(paths[i]), prep, transform, hashes[i])  # noqa: E731
            for idx, batch, errs in decoded_batches(todo, decode, batch_size, pool):
                errors.update(errs)
                if batch is not None:
                    out = engine(batch)
                    if record is not None:
                        record([hashes[i] for i in idx])
                    for i, vec in zip(idx, out):
                        feats[i] = vec
                        if cache:
                            cache.put(hashes[i], vec)
                if progress:
                    progress(len(idx) + len(errs))
    seconds = time.perf_counter() - t0 if todo else 0.0
    ok = sorted(feats)
    mat = np.stack([feats[i] for i in ok]).astype(np.float32) if ok else np.zeros((0, dim), np.float32)
    return ExtractionResult(
        features=mat,
        ok_indices=ok,
        errors=dict(sorted(errors.items())),
        computed=len(todo) - sum(1 for i in todo if i in errors),
        cached=cached,
        seconds=seconds,
        engine=engine_name,
        precision=precision,
    )


def check_same_precision(precisions: list[str]) -> None:
    """Refuse features computed at different precisions by the ranks (``precisions[r]`` is rank
    r's): with ``--precision auto`` a machine with native bf16 picks bf16 and one without fp32,
    and one model would be trained on a mix of both."""
    if len(set(precisions)) > 1:
        ranks = ", ".join(f"rank {r}: {p}" for r, p in enumerate(precisions))
        raise distributed.DistributedError(f"ranks computed features at different precisions ({ranks}); "
                                           "pass --precision fp32 (or bf16) so that every machine computes the same")


def extract_features_sharded(paths: Sequence[str | os.PathLike], runner: BackboneRunner, **options) -> ExtractionResult:
    """:func:`extract_features` of all ``paths``, split across the ranks of a torchrun job.

    Each rank extracts its :func:`~imgclf.distributed.shard` (its cache hits skipped) and every
    rank gets the whole result, rows in the order of ``paths``, through the process group. The
    work per image is the same as in one process, so the features are too. In a single
    process this is :func:`extract_features`. ``progress`` counts this rank's images.
    """
    if distributed.current() is None:
        return extract_features(paths, runner, **options)
    mine = distributed.shard(len(paths))
    local = extract_features([paths[i] for i in mine], runner, **options)
    ok_here = np.asarray([mine[i] for i in local.ok_indices], dtype=np.int64)
    summary = ({mine[i]: msg for i, msg in local.errors.items()}, local.computed, local.cached, local.seconds, local.engine, local.precision,
               (len(paths), distributed.items_digest(paths)))
    summaries = distributed.all_gather_object(summary)  # waits for the slowest rank's share
    rows = distributed.all_gather_rows(local.features.astype(np.float32, copy=False))
    oks = distributed.all_gather_rows(ok_here)
    differ = [rank for rank, s in enumerate(summaries) if s[6] != summaries[0][6]]
    if differ:  # sharding assumed the same list everywhere: these rows cannot be put together
        raise distributed.DistributedError(f"rank(s) {', '.join(map(str, differ))} extracted features of other images than rank 0; "
                                           "every machine needs the same files at the same paths")
    check_same_precision([s[5] for s in summaries])
    dim = runner.spec.feature_dim
    ok = np.concatenate(oks)
    order = np.argsort(ok, kind="stable")
    features = np.concatenate(rows)[order] if len(ok) else np.zeros((0, dim), np.float32)
    errors: dict[int, str] = {}
    for errs, *_ in summaries:
        errors.update(errs)
    computing = [s for s in summaries if s[1]]
    return ExtractionResult(
        features=np.ascontiguousarray(features, dtype=np.float32),
        ok_indices=[int(i) for i in ok[order]],
        errors=dict(sorted(errors.items())),
        computed=sum(s[1] for s in summaries),
        cached=sum(s[2] for s in summaries),
        seconds=max(s[3] for s in summaries),  # the ranks ran at the same time
        engine=computing[0][4] if computing else "cache",
        precision=(computing[0] if computing else summaries[0])[5],
    )
