#!/usr/bin/env python
"""End-to-end batch prediction throughput: ONNX Runtime on the exported model vs eager PyTorch.

    .venv/bin/python benchmarks/bench_predict.py                       # ~3-5 min on 2 cores
    .venv/bin/python benchmarks/bench_predict.py --n 512 --engines onnx torch-fp32
    .venv/bin/python benchmarks/bench_predict.py --model runs/train --out results.json

What is timed is what ``imgclf predict`` does for a folder: decode + resize/crop + inference
+ writing the CSV, on a folder of 224×224 JPEGs (made from ``--data``, default
``../shared/data/flowers12``, centre-cropped and resized with bicubic, quality 90; synthetic
shapes if that folder is missing). Each engine runs in its own fresh process (so its peak
memory is its own: ``ru_maxrss``, model load included), predicts a few images to warm up,
then the whole folder ``--repeat`` times; the best pass is reported (img/s = images / wall
seconds of ``predict_table`` + CSV write).

Engines:
* ``onnx``        imgclf.predict.onnx_predictor.OnnxClassifier on ``model.onnx`` (the whole model in one
                  graph, ONNX Runtime fp32) — what ``predict --engine onnx`` runs;
* ``onnx-int8``   the same on ``model.int8.onnx`` (static int8, ``export --quantize int8``);
* ``torch-fp32``  eager PyTorch: ImageClassifier with ``engine=torch, precision=fp32`` and
                  no feature cache (channels-last, inference mode, batch 32) — the baseline;
* ``torch-bf16``  the same under bf16 autocast (only where the CPU has native bf16);
* ``features``    imgclf's feature path with its default engine choice (OpenVINO bf16 on
                  CPUs with bf16, else ONNX Runtime), feature cache off;
* ``auto``        what ``predict --engine auto`` picks (``predictor_for``): the faster of
                  ``onnx`` and ``features`` as it measures them once on the model's test images
                  (within parity), feature cache off; its load time includes that measurement.

The model is ``--model`` or, by default, a quick one trained here on the generated folder
(``--recipe fast`` where the CLI has it: efficientnet_lite0_stages since 2026-12-02, the conv-head
efficientnet_lite0 before) and exported with
``imgclf export --quantize int8``. Everything lives in a temporary folder removed at the end
(``--keep-temp`` keeps it); nothing is written into the repository or the user's cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "flowers12"
ENGINES = ["onnx", "onnx-int8", "torch-fp32", "torch-bf16", "features", "auto"]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


# --------------------------------------------------------------------------- data and model


def make_jpeg_folder(data: Path, out: Path, n: int, size: int = 224, seed: int = 0) -> list[Path]:
    """``n`` size×size JPEGs in ``out/<class>/`` from a dataset folder (or synthetic shapes)."""
    import random

    from PIL import Image

    from imgclf.data.datasets import collect_image_paths

    sources: list[Path] = []
    if data.is_dir():
        sources, _ = collect_image_paths([data])
    rng = random.Random(seed)
    rng.shuffle(sources)
    written = []
    if sources:
        for i, src in enumerate(sources[:n] if len(sources) >= n else [sources[k % len(sources)] for k in range(n)]):
            with Image.open(src) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.Resampling.BICUBIC)
                cls = src.parent.name
                d = out / cls
                d.mkdir(parents=True, exist_ok=True)
                p = d / f"{i:05d}.jpg"
                im.save(p, quality=90)
                written.append(p)
        return written
    import numpy as np
    from PIL import ImageDraw

    gen = np.random.default_rng(seed)
    for i in range(n):
        cls = ("circle", "square")[i % 2]
        img = Image.fromarray(gen.integers(80, 170, (size, size, 3), dtype=np.uint8))
        d = ImageDraw.Draw(img)
        r = int(size * gen.uniform(0.2, 0.35))
        c = size // 2
        (d.ellipse if cls == "circle" else d.rectangle)([c - r, c - r, c + r, c + r], fill=(200, 40, 40) if cls == "circle" else (40, 60, 200))
        (out / cls).mkdir(parents=True, exist_ok=True)
        p = out / cls / f"{i:05d}.jpg"
        img.save(p, quality=90)
        written.append(p)
    return written


def _imgclf(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgclf", *args], capture_output=True, text=True, env=env)


def train_and_export(images: Path, work: Path, env) -> tuple[Path, dict]:
    """A quick ``--recipe fast`` model on ``images`` (flat layout), exported fp32 + int8."""
    help_text = _imgclf("train", "--help", env=env).stdout
    recipe = ["--recipe", "fast"] if "--recipe" in help_text else []
    t = time.perf_counter()
    r = _imgclf("-q", "train", str(images), "--project", str(work / "runs"), "--name", "bench", "--epochs", "15", "--no-progress", *recipe, env=env)
    if r.returncode != 0:
        raise SystemExit(f"training the benchmark model failed: {r.stderr.strip()[-2000:]}")
    train_s = time.perf_counter() - t
    run = work / "runs" / "bench"
    t = time.perf_counter()
    r = _imgclf("-q", "export", str(run), "--quantize", "int8", env=env)
    if r.returncode != 0:
        raise SystemExit(f"export failed: {r.stderr.strip()[-2000:]}")
    export_s = time.perf_counter() - t
    log(r.stdout.strip())
    return run, {"train_seconds": round(train_s, 1), "export_seconds_with_int8": round(export_s, 1), "export_output": r.stdout.strip().splitlines()}


# --------------------------------------------------------------------------- one engine (child process)


def worker(engine: str, model: Path, images: Path, repeat: int, out_csv: Path) -> dict:
    from imgclf.data.datasets import collect_image_paths
    from imgclf.fileio import atomic_write_bytes
    from imgclf.fileio import csv_text

    t0 = time.perf_counter()
    if engine == "onnx":
        from imgclf.predict.onnx_predictor import OnnxClassifier

        clf = OnnxClassifier(model / "model.onnx")
        desc = "ONNX Runtime fp32, whole model"
    elif engine == "auto":
        from imgclf.predict.choose import predictor_for

        clf = predictor_for(model, "auto", use_cache=False, cache_dir=out_csv.parent / "auto-cache")
        desc = "predict --engine auto → " + (f"ONNX Runtime on {clf.path.name}" if hasattr(clf, "path") else "feature path")
    elif engine == "onnx-int8":
        from imgclf.predict.onnx_predictor import OnnxClassifier

        clf = OnnxClassifier(model / "model.int8.onnx")
        desc = "ONNX Runtime static int8 (QDQ), whole model"
    else:
        from imgclf.train.classifier import ImageClassifier

        kw = {"torch-fp32": dict(engine="torch", precision="fp32"), "torch-bf16": dict(engine="torch", precision="bf16"), "features": dict(engine="auto", precision="auto")}[engine]
        clf = ImageClassifier.load(model, use_cache=False, **kw)
        desc = f"ImageClassifier engine={kw['engine']} precision={kw['precision']}, no feature cache"
    paths, _ = collect_image_paths([images])
    clf.predict_table(paths[:8])  # warm-up: engine build/compile, first-batch allocations
    load_s = time.perf_counter() - t0
    if hasattr(clf, "backbone_runner"):
        ex = clf.backbone_runner().get()
        desc += f" → {ex.name} {ex.precision}"
    passes = []
    for _ in range(repeat):
        t = time.perf_counter()
        rows = clf.predict_table(paths)
        text = csv_text(rows, ["path", "predicted", *clf.class_names_, "error"])
        atomic_write_bytes(out_csv, text.encode())
        passes.append(time.perf_counter() - t)
    errors = sum(1 for r in rows if r["error"])
    best = min(passes)
    return {
        "engine": engine, "description": desc, "images": len(paths), "errors": errors,
        "img_per_s": round(len(paths) / best, 1), "best_seconds": round(best, 3), "pass_seconds": [round(p, 3) for p in passes],
        "load_and_warmup_seconds": round(load_s, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "predicted_counts": _counts(rows), "load": load_note(),
    }


def _counts(rows) -> dict:
    out: dict[str, int] = {}
    for r in rows:
        out[str(r["predicted"])] = out.get(str(r["predicted"]), 0) + 1
    return out


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="dataset folder to take photos from (default: ../shared/data/flowers12)")
    ap.add_argument("--n", type=int, default=256, help="images in the 224x224 JPEG folder (default: 256)")
    ap.add_argument("--model", default=None, help="a run folder with model.onnx (+ model.int8.onnx) (default: train and export one here)")
    ap.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    ap.add_argument("--repeat", type=int, default=2, help="timed passes per engine; the best is reported (default: 2)")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    ap.add_argument("--keep-temp", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--images", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--csv", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.model), Path(args.images), args.repeat, Path(args.csv))))
        return 0

    work = Path(tempfile.mkdtemp(prefix="imgclf-bench-predict-"))
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(work / "cache"), "IMGCLF_OFFLINE": os.environ.get("IMGCLF_OFFLINE", "1")}
    try:
        log(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {load_note()}")
        images = work / "images"
        t = time.perf_counter()
        paths = make_jpeg_folder(Path(args.data), images, args.n)
        log(f"{len(paths)} 224x224 JPEGs from {args.data if Path(args.data).is_dir() else 'synthetic shapes'} in {time.perf_counter() - t:.1f} s")
        setup: dict = {}
        if args.model:
            model = Path(args.model)
        else:
            log("training a quick default-backbone model and exporting it (fp32 + int8)")
            model, setup = train_and_export(images, work, env)
        results = []
        for engine in args.engines:
            if engine == "onnx-int8" and not (model / "model.int8.onnx").is_file():
                log("skipping onnx-int8: no model.int8.onnx")
                continue
            if engine == "torch-bf16":
                from imgclf.engines.runtimes import cpu_has_bf16

                if not cpu_has_bf16():
                    log("skipping torch-bf16: no native bf16 on this CPU")
                    continue
            log(f"{engine}: running ({load_note()})")
            r = subprocess.run(
                [sys.executable, __file__, "--worker", engine, "--model", str(model), "--images", str(images), "--repeat", str(args.repeat), "--csv", str(work / f"{engine}.csv")],
                capture_output=True, text=True, env=env,
            )
            if r.returncode != 0:
                log(f"{engine} failed: {r.stderr.strip()[-1500:]}")
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            results.append(res)
            log(f"{engine}: {res['img_per_s']} img/s, peak RSS {res['peak_rss_mb']} MB ({res['description']})")
        by = {r["engine"]: r for r in results}
        summary = {
            "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "images": len(paths), "setup": setup, "results": results,
        }
        if "onnx" in by and "torch-fp32" in by:
            summary["onnx_vs_eager_fp32"] = round(by["onnx"]["img_per_s"] / by["torch-fp32"]["img_per_s"], 2)
        print(f"\n{'engine':<12} {'img/s':>8} {'best s':>8} {'peak RSS MB':>12} {'load+warm s':>12}  description")
        for r in results:
            print(f"{r['engine']:<12} {r['img_per_s']:>8} {r['best_seconds']:>8} {r['peak_rss_mb']:>12} {r['load_and_warmup_seconds']:>12}  {r['description']}")
        if "onnx_vs_eager_fp32" in summary:
            print(f"\nONNX Runtime / eager PyTorch fp32: {summary['onnx_vs_eager_fp32']}x (target >= 2x)")
        print(f"{len(paths)} images of 224x224; {load_note()} at the end")
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    finally:
        if args.keep_temp:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
