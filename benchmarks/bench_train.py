#!/usr/bin/env python
"""Benchmarks of imgclf: training wall time against the classic recipe, and backbone
extraction throughput per engine/precision.

    .venv/bin/python benchmarks/bench_train.py                  # everything (~9 min on 2 idle cores)
    .venv/bin/python benchmarks/bench_train.py --skip-extraction
    .venv/bin/python benchmarks/bench_train.py --skip-train --backbones efficientnet_lite0 resnet50
    .venv/bin/python benchmarks/bench_train.py --out results.json

1. Train comparison (``--backbone``, ``--epochs``):
   * imgclf as a user runs it: ``imgclf train --recipe fast --epochs E --patience 0`` (its
     other defaults kept, report.html and bootstrap CIs included) in a subprocess with a fresh, empty feature
     cache (cold: backbone build, ONNX export, engine compile, extraction of every image),
     then a second ``imgclf train`` with another ``--lr`` on the now-warm cache. The same
     two runs are timed in-process (``ImageClassifier.fit`` + ``evaluate``), which leaves
     out the Python/torch import time of a fresh process.
   * the classic recipe, as a faithful PyTorch loop: the same frozen backbone (from
     imgclf.backbones.modules), the same train split (imgclf.data.datasets.load_dataset, same seed), the
     recipe head (Linear 512, ReLU, Dropout 0.5, Linear N), Adam 1e-3, batch 32, the same
     number of epochs; every epoch decodes every training image again and runs the frozen
     backbone forward again (eager PyTorch fp32 under torch.no_grad), as a Keras model
     with a frozen base inside does. Then test accuracy on the test split.
2. Extraction throughput (``--backbones``): img/s of the backbone alone on pre-decoded
   images at batch 32 for each engine/precision (model build, ONNX export and engine
   compile are excluded and reported separately; one warm-up batch first; best of
   ``--repeats`` interleaved passes; slow cells such as VGG16 use fewer images), plus
   end-to-end ``imgclf.engines.extract.extract_features`` img/s (decoding + inference; uncached, so no hashing)
   with imgclf's default engine choice.

Nothing is written to the repository, the dataset or the user's feature cache: every cache
and run folder lives in a temporary folder that is deleted at the end (``--keep-temp``
keeps it). ImageNet weights are never downloaded (IMGCLF_OFFLINE=1 unless ``--online``);
a backbone whose weights are not available offline is measured with random
initialisation (``weights=none``): speed does not depend on weight values, accuracy does.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = "../shared/data/flowers12"
DEFAULT_BACKBONES = ["efficientnet_lite0", "vgg16", "resnet50", "efficientnet_b0", "mobilenet_v3_large", "convnext_tiny"]
CELLS = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]
BATCH = 32
CONTENDED = 0.10  # a measurement during which other processes used > 10% of the machine gets a †


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def one_line(e: BaseException) -> str:
    s = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {s.splitlines()[0]}"[:200]


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    import numpy
    import torch

    from imgclf.engines.runtimes import cpu_has_bf16

    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass

    def v(name):
        try:
            import importlib.metadata as md

            return md.version(name)
        except Exception:
            return None

    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True, text=True).stdout.strip()
        commit = (commit + (" (src/ modified)" if dirty else "")) or None
    except OSError:
        commit = None
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": commit,
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "cpu_has_bf16 (imgclf)": cpu_has_bf16(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {n: v(n) for n in ("imgclf", "torch", "torchvision", "onnxruntime", "openvino", "numpy", "pillow")},
        "numpy": numpy.__version__,
    }


def machine_state() -> dict:
    """Load average and a 2-thread fp32 matmul speed: shared 2-core VMs are noisy, so say how busy."""
    import statistics

    import torch

    a = torch.randn(1024, 1024)
    a @ a
    rates = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(20):
            a @ a
        rates.append(20 * 2 * 1024**3 / (time.perf_counter() - t) / 1e9)
    return {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()], "matmul_gflops_median": round(statistics.median(rates), 1),
            "matmul_gflops_min": round(min(rates), 1), "matmul_gflops_max": round(max(rates), 1)}


def cpu_snapshot() -> tuple[float, float, float]:
    """(wall, CPU-seconds busy on the whole machine, CPU-seconds of this process + reaped children)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = float("nan")
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system + t.children_user + t.children_system


def other_cpu(start: tuple[float, float, float]) -> dict:
    """CPU time other processes used since ``start``: the benchmark shares the machine with them."""
    end = cpu_snapshot()
    wall = end[0] - start[0]
    other = max(0.0, (end[1] - start[1]) - (end[2] - start[2]))
    cpus = os.cpu_count() or 1
    return {"wall_s": round(wall, 1), "other_cpu_s": round(other, 1), "other_share_of_machine": round(other / (wall * cpus), 3) if wall > 0 else None}


def other_cpu_note(d: dict) -> str:
    return (f"Other processes on this machine used {d['other_cpu_s']:.0f} CPU-seconds during this section "
            f"({100 * d['other_share_of_machine']:.0f}% of the machine's {os.cpu_count()} CPUs over {d['wall_s']:.0f} s).")


# --------------------------------------------------------------------------- helpers


def resolve_weights_offline(spec, seed: int = 0):
    """(weights argument, WeightsRef): ImageNet weights where available offline, else 'none'."""
    from imgclf.backbones.weights import WeightsUnavailableError, resolve_weights

    try:
        return "imagenet", resolve_weights(spec, "imagenet", seed=seed)
    except WeightsUnavailableError:
        return "none", resolve_weights(spec, "none", seed=seed)


def imgclf_command() -> list[str]:
    exe = Path(sys.executable).parent / "imgclf"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "imgclf"]


def warm_page_cache(root: Path) -> int:
    """Read every file once so the first timed run is not the only one paying disk reads."""
    n = 0
    for p in sorted(root.rglob("*")):
        if p.is_file():
            p.read_bytes()
            n += 1
    return n


def measure_import_seconds(repeats: int = 2) -> float:
    """Wall time of a fresh interpreter importing what `imgclf train` imports (best of N)."""
    code = "import imgclf.cli.main, imgclf.runs.train_run, imgclf.runs.folders, imgclf.data.datasets, imgclf.evaluation.metrics"
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        best = min(best, time.perf_counter() - t)
    return best


# --------------------------------------------------------------------------- 1. train comparison


def _log_seconds(text: str, pattern: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def run_cli_train(data: Path, backbone: str, weights: str, recipe: str, epochs: int, lr: float, cache: Path, project: Path, name: str) -> dict:
    cmd = [
        *imgclf_command(), "train", str(data),
        "--recipe", recipe, "--backbone", backbone, "--weights", weights,
        "--epochs", str(epochs), "--patience", "0", "--lr", str(lr),
        "--cache-dir", str(cache), "--project", str(project), "--name", name, "--no-progress",
    ]
    env = {**os.environ, "IMGCLF_CACHE_DIR": str(cache)}
    log("running: " + " ".join(cmd))
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        tail = (p.stderr.strip() or p.stdout.strip()).splitlines()
        raise RuntimeError(f"imgclf train exited {p.returncode}: {tail[-1] if tail else '(no output)'}")
    run_dir = project / name
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    try:
        train_log = (run_dir / "train.log").read_text()
    except OSError:
        train_log = ""
    return {
        "wall_s": wall,
        "accuracy": metrics["accuracy"],
        # from the run folder: imgclf.runs.train_run.train_run's own clock (logged last), the
        # HTML report step, and config.json's wall_seconds (train_run up to before the report)
        "run_train_s": _log_seconds(train_log, r"wall time ([\d.]+) s"),
        "report_s": _log_seconds(train_log, r"report written: .*\(([\d.]+) s\)"),
        "inner_wall_s": config.get("wall_seconds"),
        "feature_s": config.get("fit_summary", {}).get("feature_seconds"),
        "engine": config.get("backbone_engine"),
        "epochs_run": config.get("fit_summary", {}).get("epochs_run"),
    }


def run_inprocess(data: Path, backbone: str, weights: str, recipe: str, epochs: int, lr: float, cache: Path) -> dict:
    from imgclf.train.classifier import ImageClassifier

    t = time.perf_counter()
    clf = ImageClassifier(backbone=backbone, weights=weights, recipe=recipe, epochs=epochs, lr=lr, patience=0, cache_dir=cache, progress=False)
    clf.fit(data)
    m = clf.evaluate()
    wall = time.perf_counter() - t
    ex = clf.last_extraction_
    return {
        "wall_s": wall,
        "accuracy": m["accuracy"],
        "feature_s": clf.fit_summary_["feature_seconds"],
        "engine": {"engine": ex.engine, "precision": ex.precision},
        "epochs_run": clf.fit_summary_["epochs_run"],
    }


def run_recipe(data: Path, backbone: str, weights: str, epochs: int, seed: int = 0, batch: int = BATCH, lr: float = 1e-3) -> dict:
    """The classic recipe's training loop: decode + frozen backbone forward every epoch."""
    import numpy as np
    import torch
    from torch import nn

    from imgclf.backbones.modules import build_feature_extractor
    from imgclf.backbones.specs import get_backbone_spec
    from imgclf.backbones.weights import resolve_weights
    from imgclf.data.datasets import load_dataset
    from imgclf.data.imaging import load_rgb
    from imgclf.data.preprocess import image_to_array

    t0 = time.perf_counter()
    ds = load_dataset(data, seed=seed)  # imgclf's default fractions and seed: the same split
    spec = get_backbone_spec(backbone)
    ref = resolve_weights(spec, weights, seed=seed)
    fx = build_feature_extractor(spec, ref, seed=seed)  # eval mode, requires_grad False
    fx.eval()
    n_classes = len(ds.class_names)
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(spec.feature_dim, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, n_classes))
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    prep = spec.preprocessing

    def load(samples):
        x = np.stack([image_to_array(load_rgb(s.path), prep) for s in samples])
        return torch.from_numpy(x), torch.tensor([s.label for s in samples], dtype=torch.int64)

    train = ds.samples["train"]
    build_s = time.perf_counter() - t0
    epoch_s = []
    for epoch in range(1, epochs + 1):
        te = time.perf_counter()
        head.train()
        order = torch.randperm(len(train), generator=gen).tolist()
        total, correct = 0.0, 0
        for k in range(0, len(order), batch):
            x, y = load([train[i] for i in order[k:k + batch]])
            with torch.no_grad():
                f = fx(x)
            logits = head(f)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
        epoch_s.append(time.perf_counter() - te)
        log(f"recipe epoch {epoch}/{epochs}: loss {total / len(train):.4f} acc {correct / len(train):.4f} ({epoch_s[-1]:.1f} s)")
    head.eval()
    test = ds.samples["test"]
    hits = 0
    with torch.no_grad():
        for k in range(0, len(test), batch):
            x, y = load(test[k:k + batch])
            hits += (head(fx(x)).argmax(1) == y).sum().item()
    wall = time.perf_counter() - t0
    return {
        "wall_s": wall,
        "accuracy": hits / len(test),
        "build_s": build_s,
        "epoch_s": epoch_s,
        "n_train": len(train),
        "n_test": len(test),
        "engine": {"engine": "torch eager", "precision": "fp32"},
    }


def train_comparison(args, tmp: Path) -> dict:
    from imgclf.backbones.specs import get_backbone_spec

    spec = get_backbone_spec(args.backbone)
    weights, ref = resolve_weights_offline(spec)
    if weights == "none":
        log(f"{args.backbone}: ImageNet weights not available offline; training with random init (weights=none): accuracies are meaningless, times are not")
    lr2 = args.lr2
    out: dict = {"backbone": args.backbone, "weights": weights, "imgclf_recipe": args.imgclf_recipe, "weights_identity": ref.identity, "epochs": args.epochs, "lr_first": 1e-3, "lr_second": lr2, "rows": {}}

    log("warming the OS page cache with the dataset files")
    out["dataset_files"] = warm_page_cache(args.data)
    log("measuring fresh-interpreter import time")
    out["import_s"] = measure_import_seconds()

    def attempt(key, fn):
        try:
            snap = cpu_snapshot()
            out["rows"][key] = fn()
            out["rows"][key]["contention"] = other_cpu(snap)
        except Exception as e:  # report, keep going
            log(f"{key} failed: {one_line(e)}")
            out["rows"][key] = {"error": one_line(e)}
        gc.collect()

    cache_cli = tmp / "cache-cli"
    cache_api = tmp / "cache-api"
    project = tmp / "runs"
    project.mkdir(parents=True, exist_ok=True)
    rcp = args.imgclf_recipe
    attempt("cli_cold", lambda: run_cli_train(args.data, args.backbone, weights, rcp, args.epochs, 1e-3, cache_cli, project, "cold"))
    attempt("cli_warm", lambda: run_cli_train(args.data, args.backbone, weights, rcp, args.epochs, lr2, cache_cli, project, "warm"))
    log("in-process ImageClassifier.fit + evaluate, cold cache")
    attempt("api_cold", lambda: run_inprocess(args.data, args.backbone, weights, rcp, args.epochs, 1e-3, cache_api))
    log("in-process ImageClassifier.fit + evaluate, warm cache")
    attempt("api_warm", lambda: run_inprocess(args.data, args.backbone, weights, rcp, args.epochs, lr2, cache_api))
    log("classic recipe loop")
    attempt("recipe", lambda: run_recipe(args.data, args.backbone, weights, args.epochs))
    return out


def train_markdown(res: dict) -> str:
    rows = res["rows"]
    rec = rows.get("recipe", {}).get("wall_s")
    labels = {
        "cli_cold": "imgclf CLI `imgclf train`, 1st run (empty cache: build + export + extract + train + test + run folder)",
        "cli_warm": f"imgclf CLI `imgclf train --lr {res['lr_second']:g}`, 2nd run (warm feature cache)",
        "api_cold": "imgclf in-process `fit` + `evaluate`, 1st run (empty cache; no run folder, no report)",
        "api_warm": f"imgclf in-process `fit` + `evaluate` (lr {res['lr_second']:g}), 2nd run (warm cache)",
        "recipe": "classic recipe loop (decode + frozen backbone every epoch, eager torch fp32)",
    }
    lines = [
        f"Backbone `{res['backbone']}` (weights: {res['weights']}), {res['epochs']} epochs, batch 32, Adam "
        f"(1st runs lr 1e-3, 2nd runs lr {res['lr_second']:g}); imgclf `--recipe {res['imgclf_recipe']} --epochs {res['epochs']} --patience 0` "
        "(frozen backbone, cached features, every epoch run), otherwise its defaults (bootstrap CIs, report.html).",
        "",
        "| method | engine | wall s | test accuracy | recipe / this |",
        "|---|---|---:|---:|---:|",
    ]
    for key, label in labels.items():
        r = rows.get(key)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {label} | | failed: {r['error']} | | |")
            continue
        eng = r.get("engine") or {}
        eng_s = f"{eng.get('engine', '?')} {eng.get('precision', '')}".strip()
        if key.endswith("warm") and eng.get("engine") == "cache":
            eng_s = "feature cache (no backbone)"
        ratio = f"{rec / r['wall_s']:.1f}x" if rec and r["wall_s"] > 0 else ""
        mark = " †" if (r.get("contention", {}).get("other_share_of_machine") or 0) > CONTENDED else ""
        lines.append(f"| {label} | {eng_s} | {r['wall_s']:.1f}{mark} | {r['accuracy']:.4f} | {ratio} |")
    lines.append("")
    notes = []
    for a, b, what in (("cli_cold", "cli_warm", "CLI"), ("api_cold", "api_warm", "in-process")):
        ra, rb = rows.get(a, {}), rows.get(b, {})
        if "wall_s" in ra and "wall_s" in rb:
            notes.append(f"- {what}: 2nd run / 1st run = {rb['wall_s']:.1f} s / {ra['wall_s']:.1f} s = {rb['wall_s'] / ra['wall_s']:.2f}")
    for key in ("cli_cold", "cli_warm"):
        r = rows.get(key, {})
        if "wall_s" not in r:
            continue
        parts = [f"- {key}: {r['wall_s']:.1f} s process wall"]
        if r.get("run_train_s") is not None:
            parts.append(f"{r['run_train_s']:.1f} s inside `train_run` by its own clock (so {r['wall_s'] - r['run_train_s']:.1f} s interpreter start, imports before it and exit)")
        if r.get("report_s") is not None:
            parts.append(f"report.html {r['report_s']:.1f} s")
        if r.get("feature_s") is not None:
            parts.append(f"train+validation feature step {r['feature_s']:.1f} s")
        notes.append(", ".join(parts))
    if any((r.get("contention", {}).get("other_share_of_machine") or 0) > CONTENDED for r in rows.values()):
        notes.append(f"- † = other processes used > {100 * CONTENDED:.0f}% of the machine during that run (slower than on an idle machine)")
    notes.append(f"- a fresh interpreter importing imgclf's CLI modules (torch, sklearn, ...) takes {res['import_s']:.1f} s here")
    r = rows.get("api_cold", {})
    if "feature_s" in r:
        notes.append(f"- in-process 1st run: {r['feature_s']:.1f} s of its {r['wall_s']:.1f} s are the train+validation feature step (backbone build, ONNX export, compile, extraction)")
    r = rows.get("recipe", {})
    if "epoch_s" in r:
        es = r["epoch_s"]
        notes.append(
            f"- recipe: {r['n_train']} train images decoded and forwarded {len(es)} times; epochs took "
            f"{', '.join(f'{s:.1f}' for s in es)} s; model build {r['build_s']:.1f} s; test pass over {r['n_test']} images included"
        )
    return "\n".join(lines + notes)


# --------------------------------------------------------------------------- 2. extraction throughput


def pick_paths(data: Path, n: int) -> list[Path]:
    """n training images spread evenly over the (sorted) train split, so every class appears."""
    from imgclf.data.datasets import load_dataset

    samples = load_dataset(data, seed=0).samples["train"]
    if n >= len(samples):
        return [s.path for s in samples]
    step = len(samples) / n
    return [samples[int(i * step)].path for i in range(n)]


def _timed_batches(engine, arr, n: int, per_batch: list | None = None) -> float:
    t = time.perf_counter()
    for k in range(0, n, BATCH):
        tb = time.perf_counter()
        engine(arr[k:min(k + BATCH, n)])
        if per_batch is not None:
            per_batch.append((min(k + BATCH, n) - k) / (time.perf_counter() - tb))
    return time.perf_counter() - t


def extraction_benchmark(args, tmp: Path) -> dict:
    import numpy as np

    from imgclf.backbones.specs import get_backbone_spec
    from imgclf.engines.extract import extract_features
    from imgclf.engines.runner import BackboneRunner
    from imgclf.engines.runtimes import cpu_has_bf16
    from imgclf.data.imaging import load_rgb
    from imgclf.data.preprocess import image_to_array

    has_bf16 = cpu_has_bf16()
    paths = pick_paths(args.data, args.extraction_images)
    n_all = len(paths)
    out = {"images": n_all, "batch": BATCH, "cell_seconds": args.cell_seconds, "repeats": args.repeats, "cpu_has_bf16": has_bf16, "rows": []}
    for bname in args.backbones:
        row: dict = {"backbone": bname, "cells": {}}
        out["rows"].append(row)
        cache = tmp / "cache-extract" / bname
        try:
            spec = get_backbone_spec(bname)
            row["weights"], ref = resolve_weights_offline(spec)
            row["input_size"] = spec.preprocessing.input_size
            t = time.perf_counter()
            arr = np.stack([image_to_array(load_rgb(p, draft_size=2 * spec.preprocessing.resize_size), spec.preprocessing) for p in paths])
            row["decode_img_s_1thread"] = n_all / (time.perf_counter() - t)
        except Exception as e:
            row["error"] = one_line(e)
            log(f"{bname}: failed before measuring: {row['error']}")
            continue
        # build every engine first (setup time, warm-up batch, images per pass), then time
        # them in `repeats` interleaved passes and keep each cell's best pass: on a shared
        # machine, interference only ever makes a pass slower
        engines: dict = {}
        for eng, prec in CELLS:
            key = f"{eng} {prec}"
            if prec == "bf16" and not has_bf16:
                row["cells"][key] = {"skipped": "CPU has no native bf16 (avx512_bf16/amx_bf16)"}
                continue
            try:
                t = time.perf_counter()
                runner = BackboneRunner(spec, ref, cache, engine=eng, precision=prec)
                engine = runner.get()
                setup = time.perf_counter() - t
                if (engine.name, engine.precision) != (eng, prec):
                    raise RuntimeError(f"got {engine.name} {engine.precision} instead")
                warm = _timed_batches(engine, arr, min(BATCH, n_all))
                est = min(BATCH, n_all) / warm
                n = min(n_all, max(BATCH, int(args.cell_seconds * est) // BATCH * BATCH))
                engines[key] = (runner, engine, n)
                row["cells"][key] = {"n": n, "setup_s": setup, "warmup_batch_s": warm, "passes": []}
            except Exception as e:
                row["cells"][key] = {"error": one_line(e)}
                log(f"{bname} {key}: failed: {one_line(e)}")
        auto = None
        try:
            t = time.perf_counter()
            runner = BackboneRunner(spec, ref, cache, engine="auto", precision="auto")
            engine = runner.get()
            setup = time.perf_counter() - t
            _timed_batches(engine, arr, min(BATCH, n_all))  # warm-up batch
            n = row["cells"].get(f"{engine.name} {engine.precision}", {}).get("n") or n_all
            auto = (runner, engine, n)
            row["end_to_end"] = {"engine": engine.name, "precision": engine.precision, "n": n, "setup_s": setup, "passes": []}
        except Exception as e:
            row["end_to_end"] = {"error": one_line(e)}
            log(f"{bname} end-to-end: failed: {one_line(e)}")
        for rep in range(args.repeats):
            for key, (runner, engine, n) in engines.items():
                cell = row["cells"][key]
                try:
                    rates: list = []
                    snap = cpu_snapshot()
                    dt = _timed_batches(engine, arr, n, rates)
                    cell["passes"].append({"img_s": n / dt, "batch_img_s_min": min(rates), "batch_img_s_max": max(rates), **other_cpu(snap)})
                    log(f"{bname} {key} pass {rep + 1}: {n / dt:.1f} img/s on {n} images")
                except Exception as e:
                    cell["error"] = one_line(e)
                    log(f"{bname} {key}: failed: {one_line(e)}")
            if auto:
                runner, engine, n = auto
                e2e = row["end_to_end"]
                try:
                    snap = cpu_snapshot()
                    t = time.perf_counter()
                    res = extract_features([str(p) for p in paths[:n]], runner, use_cache=False)
                    wall = time.perf_counter() - t
                    if res.errors:
                        raise RuntimeError(f"{len(res.errors)} decode errors, e.g. {next(iter(res.errors.values()))}")
                    e2e["passes"].append({"img_s": n / wall, "img_s_reported_by_imgclf": res.images_per_second, **other_cpu(snap)})
                    log(f"{bname} end-to-end ({engine.name} {engine.precision}) pass {rep + 1}: {n / wall:.1f} img/s on {n} images")
                except Exception as e:
                    row["end_to_end"] = {"error": one_line(e)}
                    auto = None
                    log(f"{bname} end-to-end: failed: {one_line(e)}")
        for c in [*row["cells"].values(), row.get("end_to_end", {})]:
            if c.get("passes") and "error" not in c:
                best = max(c["passes"], key=lambda p: p["img_s"])
                c["img_s"] = best["img_s"]
                c["other_share_of_machine"] = best["other_share_of_machine"]
        engines.clear()
        auto = runner = engine = None
        gc.collect()
    return out


def _cell_text(c: dict, n_all: int, value: str = "img_s") -> str:
    if "error" in c:
        return f"failed: {c['error'].replace('|', '/')}"
    if "skipped" in c:
        return f"n/a ({c['skipped']})"
    if value == "setup_s":
        return f"{c['setup_s']:.1f}"
    if "img_s" not in c:
        return "failed: no timing"
    s = f"{c['img_s']:.1f}"
    if c.get("n") and c["n"] < n_all:
        s += f" (n={c['n']})"
    if (c.get("other_share_of_machine") or 0) > CONTENDED:
        s += " †"
    return s


def extraction_markdown(res: dict) -> str:
    n_all = res["images"]
    keys = [f"{e} {p}" for e, p in CELLS]
    head = "| backbone | weights | " + " | ".join(keys) + " | end-to-end `extract_features` (default engine) | decode only, 1 thread |"
    lines = [
        f"Backbone-only img/s at batch {res['batch']} on {n_all} pre-decoded flowers12 train images "
        f"(fewer, shown as n=..., where one pass would exceed ~{res['cell_seconds']:g} s); one warm-up batch first; "
        f"best of {res['repeats']} interleaved passes; model build / ONNX export / compile excluded (next table). "
        "End-to-end = `extract_features(paths, runner, use_cache=False)` wall time: JPEG decoding in its "
        f"2 threads and inference, engine chosen by imgclf (`auto`). † = other processes used > {100 * CONTENDED:.0f}% "
        "of the machine during that (best) pass.",
        "",
        head,
        "|---|---|" + "---:|" * (len(keys) + 2),
    ]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['backbone']} | | failed: {r['error']} |" + " |" * (len(keys) + 1))
            continue
        cells = [_cell_text(r["cells"].get(k, {"error": "not run"}), n_all) for k in keys]
        e2e = r.get("end_to_end", {})
        if "error" in e2e or "img_s" not in e2e:
            e2e_s = f"failed: {e2e.get('error', 'no timing')}"
        else:
            e2e_s = f"{e2e['img_s']:.1f} ({e2e['engine']} {e2e['precision']}" + (f", n={e2e['n']})" if e2e["n"] < n_all else ")")
            if (e2e.get("other_share_of_machine") or 0) > CONTENDED:
                e2e_s += " †"
        lines.append(f"| {r['backbone']} | {r['weights']} | " + " | ".join(cells) + f" | {e2e_s} | {r['decode_img_s_1thread']:.0f} |")
    lines += ["", "Setup seconds per cell (backbone build + ONNX export + engine compile; the ONNX file is exported once per backbone and reused):", ""]
    lines.append("| backbone | " + " | ".join(keys) + " |")
    lines.append("|---|" + "---:|" * len(keys))
    for r in res["rows"]:
        if "error" in r:
            continue
        lines.append(f"| {r['backbone']} | " + " | ".join(
            _cell_text(r["cells"][k], n_all, "setup_s") if "setup_s" in r["cells"].get(k, {}) else "" for k in keys) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help=f"dataset root; relative paths are resolved against the repo root (default: {DEFAULT_DATA})")
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone of the train comparison (default: efficientnet_lite0)")
    p.add_argument("--epochs", type=int, default=5, help="epochs for imgclf and the recipe loop (default: 5)")
    p.add_argument("--imgclf-recipe", default="fast", help="imgclf --recipe for the train comparison (default: fast = frozen backbone, cached features, head only)")
    p.add_argument("--lr2", type=float, default=5e-4, help="learning rate of the 2nd (warm-cache) imgclf run (default: 5e-4)")
    p.add_argument("--skip-train", action="store_true", help="skip the train comparison")
    p.add_argument("--skip-extraction", action="store_true", help="skip the extraction throughput table")
    p.add_argument("--extraction-images", type=int, default=128, help="images per extraction cell (default: 128)")
    p.add_argument("--cell-seconds", type=float, default=8.0, help="time budget per extraction cell and pass: slow cells (VGG16) use fewer images, in whole batches, at least one (default: 8)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per extraction cell; the best is reported (default: 2)")
    p.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES, help="backbones of the extraction table (default: %(default)s)")
    p.add_argument("--out", default=None, help="also write all results as JSON here")
    p.add_argument("--keep-temp", action="store_true", help="keep the temporary cache/run folder")
    p.add_argument("--online", action="store_true", help="allow imgclf to look for ImageNet weights online (default: offline, IMGCLF_OFFLINE=1)")
    args = p.parse_args(argv)
    d = Path(args.data).expanduser()
    args.data = (d if d.is_absolute() else REPO / d).resolve()
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.extraction_images < 1:
        p.error("--extraction-images must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.online:
        os.environ["IMGCLF_OFFLINE"] = "1"
    if not (args.data / "train").is_dir():
        print(f"bench_train: no dataset at {args.data} (expected train/<class>/...)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="imgclf-bench-"))
    os.environ["IMGCLF_CACHE_DIR"] = str(tmp / "cache-default")  # anything that falls back to the default cache stays here
    log(f"temporary caches and runs under {tmp}")
    results: dict = {"machine": machine_info(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    md = [f"# imgclf benchmarks ({results['machine']['date']})", "",
          f"Machine: {results['machine']['cpu_model']}, {results['machine']['cpus']} CPUs, "
          f"AVX-512F {'yes' if results['machine']['avx512f'] else 'no'}, AVX512-BF16 {'yes' if results['machine']['avx512_bf16'] else 'no'}, "
          f"AMX-BF16 {'yes' if results['machine']['amx_bf16'] else 'no'}; torch {results['machine']['versions']['torch']}, "
          f"onnxruntime {results['machine']['versions']['onnxruntime']}, openvino {results['machine']['versions']['openvino']}. "
          f"imgclf at commit {results['machine']['git_commit']}. Dataset {args.data}."]
    results["machine_state_start"] = machine_state()
    log(f"machine state at start: {results['machine_state_start']}")
    t_all = time.perf_counter()
    try:
        if not args.skip_train:
            snap = cpu_snapshot()
            results["train"] = train_comparison(args, tmp)
            results["train"]["contention"] = other_cpu(snap)
            md += ["", "## Train comparison", "", train_markdown(results["train"]), "", other_cpu_note(results["train"]["contention"])]
            print("\n".join(md), flush=True)
            md_printed = len(md)
        else:
            md_printed = 0
        if not args.skip_extraction:
            snap = cpu_snapshot()
            results["extraction"] = extraction_benchmark(args, tmp)
            results["extraction"]["contention"] = other_cpu(snap)
            md += ["", "## Extraction throughput", "", extraction_markdown(results["extraction"]), "", other_cpu_note(results["extraction"]["contention"])]
        results["total_seconds"] = time.perf_counter() - t_all
        results["machine_state_end"] = machine_state()
        st0, st1 = results["machine_state_start"], results["machine_state_end"]
        md += ["", f"Total benchmark time: {results['total_seconds']:.0f} s. Machine state (load average 1/5/15 min; "
               f"2-thread fp32 1024x1024 matmul GFLOP/s median [min-max] of 7): start {st0['loadavg_1_5_15']}, "
               f"{st0['matmul_gflops_median']} [{st0['matmul_gflops_min']}-{st0['matmul_gflops_max']}]; end {st1['loadavg_1_5_15']}, "
               f"{st1['matmul_gflops_median']} [{st1['matmul_gflops_min']}-{st1['matmul_gflops_max']}]."]
        print("\n".join(md[md_printed:]), flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
            log(f"results written to {args.out}")
    finally:
        if args.keep_temp:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
