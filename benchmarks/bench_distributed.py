#!/usr/bin/env python
"""Benchmark of imgclf under torchrun: backbone extraction and stage-2 throughput in one
process with 2 threads against ``torchrun --nproc-per-node 2`` with 1 thread per rank, and the
time each rank spends in collectives.

    .venv/bin/python benchmarks/bench_distributed.py                       # isic8, 600 images, 2 epochs
    .venv/bin/python benchmarks/bench_distributed.py --data ../shared/data/flowers12 --limit 0 --out r.json

Each configuration runs in a fresh subprocess (``--worker``) with its own empty feature cache,
so extraction is uncached:

1. Extraction: ``extract_features`` of this rank's shard of the training images (decoding +
   the frozen backbone on imgclf's default engine), then the gather of every rank's rows.
   img/s = images / (wall time from the first barrier to the end of the gather, slowest rank).
   Communication = the gather alone, timed after a barrier (so waiting for a slower rank is
   not counted as communication).
2. Stage 2: :func:`imgclf.train.finetune.finetune` with the entry's default ``unfreeze``, one
   view, ``--finetune-epochs`` epochs, no early stopping: prefix activations of this rank's
   shard, then the tail trained (DistributedDataParallel under torchrun). img/s = training
   images x epochs / training wall time (``summary["images_per_second"]``). Communication per
   epoch = ``summary["communication_seconds"]`` / epochs: every gradient all-reduce from launch
   to completion (it overlaps the backward pass, so it is an upper bound on what it costs)
   plus the validation-logit gathers and rank 0's decisions, on rank 0.

Nothing is written to the repository or the dataset (temporary folders, deleted at the end).
Other processes on the machine skew the numbers: the load average before each configuration
is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = str(REPO.parent / "shared" / "data" / "isic8")


def worker(args) -> None:
    """One configuration: runs in each rank (or the single process); rank 0 prints the JSON."""
    import numpy as np
    import torch

    from imgclf import distributed

    ctx = distributed.setup("cpu")
    if ctx is None:
        torch.set_num_threads(args.threads)
    from imgclf.backbones.specs import get_backbone_spec
    from imgclf.backbones.weights import resolve_weights
    from imgclf.config.recipes import default_unfreeze, make_settings
    from imgclf.data.augment import build_augment
    from imgclf.data.datasets import load_dataset
    from imgclf.engines.extract import extract_features
    from imgclf.engines.runner import BackboneRunner
    from imgclf.model.heads import build_head
    from imgclf.train.finetune import finetune
    from imgclf.train.loops import TrainConfig

    ds = load_dataset(args.data, val_fraction=0.2, test_fraction=0.0, seed=0)
    rng = np.random.default_rng(0)
    train, val = ds.samples["train"], ds.samples["validation"]
    if args.limit:
        train = [train[i] for i in sorted(rng.choice(len(train), min(args.limit, len(train)), replace=False))]
        val = [val[i] for i in sorted(rng.choice(len(val), min(max(1, args.limit // 4), len(val)), replace=False))]
    paths = [str(s.path) for s in train]
    spec = get_backbone_spec(args.backbone)
    runner = BackboneRunner(spec, resolve_weights(spec, "imagenet"), Path(args.cache), device="cpu")

    # 1. extraction of the training images, sharded
    mine = list(distributed.shard(len(paths)))
    runner.get()  # engine built (and the ONNX export made) before the clock starts
    distributed.barrier()
    t0 = time.perf_counter()
    local = extract_features([paths[i] for i in mine], runner, use_cache=False)
    distributed.barrier()
    t1 = time.perf_counter()
    rows = distributed.all_gather_rows(local.features)
    t2 = time.perf_counter()
    n_ok = sum(len(r) for r in rows)
    extraction = {"images": n_ok, "seconds": round(t2 - t0, 2), "images_per_second": round(n_ok / (t2 - t0), 1),
                  "communication_seconds": round(t2 - t1, 3), "engine": local.engine, "precision": local.precision}

    # 2. stage 2 on the same images (the features of step 1 give the head a start)
    y_train = np.array([s.label for s in train], np.int64)
    y_val = np.array([s.label for s in val], np.int64)
    settings = make_settings("finetune", finetune_epochs=args.epochs, finetune_patience=0, finetune_views=1)
    head = build_head("recipe", spec.feature_dim, len(ds.class_names))
    torch.manual_seed(0)
    _, history, summary = finetune(
        runner, head, paths, y_train, [str(s.path) for s in val], y_val, len(ds.class_names), TrainConfig.stage2(settings),
        unfreeze=default_unfreeze(spec), augment=build_augment("light"), views=1, cache_dir=Path(args.cache),
    )
    stage2 = {"images": len(paths), "epochs": summary["epochs_run"], "train_seconds": summary["train_seconds"],
              "images_per_second": summary["images_per_second"], "prefix_seconds": summary["prefix_seconds"],
              "communication_seconds_per_epoch": round(summary.get("communication_seconds", 0.0) / max(1, summary["epochs_run"]), 3),
              "unfreeze": summary["unfreeze"], "precision": summary["precision"]}
    if distributed.is_main():
        print("RESULT " + json.dumps({"world_size": ctx.world_size if ctx else 1, "threads": distributed.threads_per_rank() or args.threads,
                                      "extraction": extraction, "stage2": stage2}), flush=True)
    distributed.teardown()


def run_config(args, nproc: int, threads: int) -> dict:
    cache = tempfile.mkdtemp(prefix="imgclf-bench-dist-")
    flags = ["--worker", "--data", args.data, "--limit", str(args.limit), "--epochs", str(args.epochs), "--backbone", args.backbone,
             "--cache", cache, "--threads", str(threads)]
    env = {**os.environ, "IMGCLF_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    if nproc == 1:
        cmd = [sys.executable, __file__, *flags]
        env.pop("WORLD_SIZE", None)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), __file__, *flags]
        env.update({"IMGCLF_THREADS_PER_RANK": str(threads), "OMP_NUM_THREADS": str(threads)})
    load = os.getloadavg()[0]
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    subprocess.run(["rm", "-rf", cache])
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode or not lines:
        sys.exit(f"configuration {nproc} x {threads} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    result.update({"load_average_before": round(load, 2), "wall_seconds": round(wall, 1)})
    return result


def table(results: list[dict]) -> str:
    out = ["| configuration | extraction img/s | extraction gather s | stage-2 img/s | stage-2 collectives s/epoch | load before |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        e, s = r["extraction"], r["stage2"]
        name = "1 process x 2 threads" if r["world_size"] == 1 else f"torchrun {r['world_size']} ranks x {r['threads']} thread"
        out.append(f"| {name} | {e['images_per_second']} | {e['communication_seconds']} | {s['images_per_second']} | "
                   f"{s['communication_seconds_per_epoch']} | {r['load_average_before']} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--limit", type=int, default=600, help="training images used (0 = all); validation gets a quarter as many")
    p.add_argument("--epochs", type=int, default=2, help="stage-2 epochs")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--reverse", action="store_true", help="run the torchrun configuration first (order effects on a shared machine)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    configs = [(1, 2), (2, 1)][::-1 if args.reverse else 1]
    results = sorted((run_config(args, n, t) for n, t in configs), key=lambda r: r["world_size"])
    print(table(results))
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
