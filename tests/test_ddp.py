"""Stage 2 as DistributedDataParallel: ``torchrun --nproc-per-node 2 -m imgclf train`` against the
same training in one process.

The two ranks split every global batch of the single-process run by who holds each sample's
prefix activations, normalise their loss by the whole batch's denominator and draw dropout
masks for the whole batch (train/finetune.py, ShardedTail), so each optimiser step is the
single-process step; only the order of float sums differs (each rank sums its part of the
gradient, then the all-reduce adds the parts). Those rounding differences (~1e-7 relative per
step) are why the comparison is close rather than bitwise: losses within 1e-4 relative,
probabilities within 1e-3, the same predicted classes. Both runs are fp32 (``--precision fp32``):
on a CPU with bf16, autocast's roundings (~1e-3) would differ with the batch's partition.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from imgclf.cli.main import main
from imgclf.config import layout

TRAIN_FLAGS = ["--recipe", "finetune", "--precision", "fp32", "--epochs", "3", "--finetune-epochs", "2", "--unfreeze", "2", "--finetune-views", "2",
               "--bootstrap", "0", "--no-report", "--no-neighbors", "--no-progress"]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _torchrun_env():
    env = dict(os.environ)
    env.update({"IMGCLF_THREADS_PER_RANK": "1", "OMP_NUM_THREADS": "1", "IMGCLF_DIST_TIMEOUT_S": "120", "IMGCLF_DEBUG": "1"})
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def test_two_rank_stage_two_matches_one_process(shapes_root, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main(["-q", "train", str(shapes_root), "--project", str(single), "--name", "r", *TRAIN_FLAGS]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "imgclf", "-q", "train", str(shapes_root), "--project", str(multi), "--name", "r", *TRAIN_FLAGS]
    done = subprocess.run(cmd, env=_torchrun_env(), capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]

    # the run folder is written once, by rank 0
    assert sorted(p.name for p in multi.iterdir()) == ["r"]
    run = multi / "r"
    assert json.loads((run / layout.STATUS).read_text())["status"] == "complete"
    config = json.loads((run / layout.CONFIG).read_text())
    tuned = [s for s in config["fit_summary"]["stages"] if s["stage"] == "finetune"]
    assert tuned and tuned[0]["world_size"] == 2 and tuned[0]["communication_seconds"] > 0 and tuned[0]["device"] == "cpu"

    one, two = _rows(single / "r" / layout.EPOCH_METRICS), _rows(run / layout.EPOCH_METRICS)
    assert [(r["stage"], r["epoch"], r["best"]) for r in one] == [(r["stage"], r["epoch"], r["best"]) for r in two]
    assert any(r["stage"] == "finetune" for r in two)
    for a, b in zip(one, two):
        for column in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert float(b[column]) == pytest.approx(float(a[column]), rel=1e-4, abs=1e-6), (a, b, column)

    m1, m2 = (json.loads((d / "r" / layout.TEST_METRICS).read_text()) for d in (single, multi))
    assert m2["accuracy"] == m1["accuracy"] and m2["n"] == m1["n"]
    p1, p2 = _rows(single / "r" / layout.TEST_PREDICTIONS), _rows(run / layout.TEST_PREDICTIONS)
    assert [(r["path"], r["predicted"]) for r in p1] == [(r["path"], r["predicted"]) for r in p2]
    classes = [c for c in p1[0] if c not in ("path", "true", "predicted")]
    for a, b in zip(p1, p2):
        for c in classes:
            assert float(b[c]) == pytest.approx(float(a[c]), abs=1e-3)
