#!/usr/bin/env python
"""Similar cases: how often the nearest training images carry the right label, and how fast
the search is at 10^4..10^6 stored vectors, exact vs faiss IVF (what imgclf.model.neighbors uses).

    .venv/bin/python benchmarks/bench_neighbors.py                       # both parts
    .venv/bin/python benchmarks/bench_neighbors.py --skip-search         # (a) only, 3 seeds, ~5-7 min on 2 cores
    .venv/bin/python benchmarks/bench_neighbors.py --skip-labels --sizes 10000 100000
    .venv/bin/python benchmarks/bench_neighbors.py --out /tmp/neighbors.json

(a) *Label agreement* on ``--data`` (default ``../shared/data/flowers12``): one model per
``--seeds`` value (default 0 1 2: the carved validation split and initialisation differ) is
trained with ``--recipe`` (default fast), features in one temporary cache; its similar-cases
index holds the images its heads learned from (train, and validation after a refit); each test image's 5 nearest cases (``Classifier.neighbors``) vote, and the
majority label (ties: the most similar case's label among the tied) is compared with the true
label. Reported per seed and as the mean over seeds: accuracy over the test images, its
per-class mean, the top-1 case's agreement, and the classifier's own accuracy for comparison.

(b) *Search* on synthetic 1280-d float32 vectors shaped like image features: ``--clusters``
(default 1000) random centres, each vector a centre plus Gaussian noise (std 0.7 per
dimension: cosine ≈ 0.67 within a cluster), queries drawn the same way. For each size: exact
search (``neighbors.exact_search``: one matrix product + argpartition) latency for one query at
a time and per query in a batch of 64; faiss IVF-Flat (``neighbors.AnnSearch``) build time,
extra resident memory, the same latencies, and recall@5 against exact on ``--queries``
queries. Nothing is written anywhere but ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def label_agreement(data: Path, recipe: str, k: int, seed: int, cache_dir: Path) -> dict:
    from imgclf.train.classifier import ImageClassifier

    t0 = time.perf_counter()
    clf = ImageClassifier(recipe=recipe, seed=seed, cache_dir=cache_dir).fit(data)
    fit_s = time.perf_counter() - t0
    index = clf.neighbor_index()
    test = clf.dataset_.samples["test"]
    paths = [str(s.path) for s in test]
    truth = [clf.class_names_[s.label] for s in test]
    t0 = time.perf_counter()
    found = clf.neighbors(paths, k)
    search_s = time.perf_counter() - t0
    predicted = clf.predict(paths)
    rows = []
    for cases, true, pred in zip(found, truth, predicted):
        if not cases:
            continue
        votes = Counter(c.label for c in cases)
        top = max(votes.values())
        majority = next(c.label for c in cases if votes[c.label] == top)  # ties: the most similar of the tied labels
        rows.append((true, majority, cases[0].label, pred))
    per_class = {c: np.mean([m == t for t, m, _, _ in rows if t == c]) for c in sorted({t for t, *_ in rows})}
    return {
        "data": str(data), "recipe": recipe, "seed": seed, "k": k, "train_images_indexed": len(index), "test_images": len(rows),
        "majority_accuracy": float(np.mean([m == t for t, m, _, _ in rows])),
        "majority_accuracy_class_mean": float(np.mean(list(per_class.values()))),
        "majority_accuracy_worst_class": min(per_class.items(), key=lambda kv: kv[1]),
        "top1_case_accuracy": float(np.mean([n1 == t for t, _, n1, _ in rows])),
        "classifier_accuracy": float(np.mean([p == t for t, _, _, p in rows])),
        "fit_seconds": round(fit_s, 1), "neighbors_seconds_for_test_set": round(search_s, 2),
        "index_bytes": index.nbytes,
    }


def synthetic(n: int, dim: int, centres: np.ndarray, rng: np.random.Generator, chunk: int = 50_000) -> np.ndarray:
    """n normalised rows, centre + N(0, 0.7²) noise, made in chunks (no float64 copy of the whole)."""
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        block = centres[rng.integers(0, len(centres), m)] + 0.7 * rng.standard_normal((m, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[s:s + m] = block
    return out


def per_query_seconds(fn, queries: np.ndarray, batch: int, budget_s: float = 10.0) -> float:
    """Median seconds per query, for ``batch`` queries per call, within about ``budget_s``."""
    times, t_start = [], time.perf_counter()
    for s in range(0, len(queries), batch):
        t0 = time.perf_counter()
        fn(queries[s:s + batch])
        times.append((time.perf_counter() - t0) / len(queries[s:s + batch]))
        if time.perf_counter() - t_start > budget_s and len(times) >= 3:
            break
    return float(np.median(times))


def search_table(sizes: list[int], dim: int, clusters: int, n_queries: int, k: int, seed: int) -> list[dict]:
    from imgclf.model.neighbors import AnnSearch, exact_search

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    queries = synthetic(n_queries, dim, centres, rng)
    out = []
    for n in sizes:
        t0 = time.perf_counter()
        base = synthetic(n, dim, centres, rng)
        gen_s = time.perf_counter() - t0
        row = {"n": n, "dim": dim, "base_bytes": base.nbytes, "generate_seconds": round(gen_s, 1)}
        _, truth = exact_search(base, queries, k)
        row["exact_ms_single"] = 1e3 * per_query_seconds(lambda q: exact_search(base, q, k), queries, 1)
        row["exact_ms_batch64"] = 1e3 * per_query_seconds(lambda q: exact_search(base, q, k), queries, 64)
        before = rss_bytes()
        ann = AnnSearch(base, seed=seed)
        row["ann_build_seconds"] = round(ann.build_seconds, 1)
        row["ann_extra_rss_bytes"] = rss_bytes() - before
        row["ann_nlist"], row["ann_nprobe"] = ann.nlist, ann.nprobe
        _, idx = ann.search(queries, k)
        row[f"recall@{k}"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(idx, truth)]))
        row["ann_ms_single"] = 1e3 * per_query_seconds(lambda q: ann.search(q, k), queries, 1)
        row["ann_ms_batch64"] = 1e3 * per_query_seconds(lambda q: ann.search(q, k), queries, 64)
        print(json.dumps(row), flush=True)
        out.append(row)
        ann = base = None  # free both before the next, larger size
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flowers12"))
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(a): one model per seed (split carving, initialisation); the mean is reported")
    ap.add_argument("--skip-labels", action="store_true")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("IMGCLF_OFFLINE", "1")
    result: dict = {}
    if not args.skip_labels:
        with tempfile.TemporaryDirectory(prefix="bench-neighbors-") as tmp:  # one feature cache for all seeds
            runs = [label_agreement(Path(args.data), args.recipe, args.k, seed, Path(tmp) / "cache") for seed in args.seeds]
        for r in runs:
            print(json.dumps(r), flush=True)
        means = {key: float(np.mean([r[key] for r in runs])) for key in ("majority_accuracy", "majority_accuracy_class_mean", "top1_case_accuracy", "classifier_accuracy")}
        result["labels"] = {"runs": runs, "mean": means}
        print(json.dumps({"mean over seeds": means}), flush=True)
    if not args.skip_search:
        import faiss

        result["faiss"] = {"version": faiss.__version__, "threads": faiss.omp_get_max_threads()}
        result["search"] = search_table(args.sizes, args.dim, args.clusters, args.queries, args.k, args.seed)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
