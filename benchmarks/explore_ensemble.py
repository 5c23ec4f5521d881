"""Embedded backbones together, through the real pipeline (issue 12): one ``imgclf train
--recipe fast`` run per EfficientNet-Lite backbone (each a fresh process with an empty
feature cache, so its wall time includes cold extraction), then the members' test
probabilities (each already temperature-calibrated on the run's validation split; the
seed fixes the same split for every backbone) averaged into a probability ensemble.

Every row is scored from ``test_predictions.csv`` the same way (argmax decisions, no
bootstrap), so members and ensembles compare on equal terms; ``wall_s`` of an ensemble
is the sum of its members'. Usage:

    .venv/bin/python benchmarks/explore_ensemble.py --data ../shared/data/isic8/binary.csv --seeds 0 1 2 --workdir /tmp/ens --out /tmp/ens/binary.json
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_recipes import run_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
SHORT = {b: b.replace("efficientnet_", "") for b in BACKBONES}


def read_predictions(run: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    with open(run / "test_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = list(rows[0].keys())[3:]
    paths = [r["path"] for r in rows]
    y = np.array([classes.index(r["true"]) for r in rows])
    probs = np.array([[float(r[c]) if r[c] != "" else np.nan for c in classes] for r in rows])
    return paths, y, probs, classes


def score(y, probs, classes) -> dict:
    from imgclf.evaluation.metrics import classification_metrics

    ok = np.isfinite(probs).all(1)
    m = classification_metrics(y[ok], probs[ok], classes, bootstrap=0)
    return {k: m.get(k) for k in ("accuracy", "balanced_accuracy", "roc_auc", "log_loss", "ece")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="dataset folder or manifest CSV")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    ap.add_argument("--workdir", type=Path, required=True, help="run folders and caches (kept, so a rerun reuses finished members)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    rows = []
    for seed in a.seeds:
        members = {}
        for bb in a.backbones:
            name = SHORT.get(bb, bb)
            run = a.workdir / f"runs-{seed}" / name
            done = a.workdir / f"runs-{seed}" / f"{name}.json"
            if done.is_file() and (run / "test_predictions.csv").is_file():
                info = json.loads(done.read_text())
            else:
                info = run_recipe(Path(a.data), name, bb, seed, ["--recipe", "fast", "--bootstrap", "0", "--no-report", "--no-neighbors"], a.workdir)
                if info.get("rc") != 0:
                    print(f"seed {seed} {bb}: failed: {info.get('error')}", file=sys.stderr)
                    return 1
                done.write_text(json.dumps(info))
            paths, y, probs, classes = read_predictions(run)
            members[name] = (paths, y, probs, info["wall_s"])
        names = list(members)
        ref_paths, y, _, _ = members[names[0]]
        assert all(m[0] == ref_paths for m in members.values()), "members scored different test images"
        for r in range(1, len(names) + 1):
            for combo in itertools.combinations(names, r):
                probs = np.mean([members[n][2] for n in combo], 0)
                row = {"seed": seed, "members": "+".join(combo), "wall_s": round(sum(members[n][3] for n in combo), 1), **score(y, probs, classes)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{a.data} (means over seeds {' '.join(map(str, a.seeds))}; argmax decisions)\n")
    keys = ("accuracy", "balanced_accuracy", "roc_auc", "log_loss", "ece", "wall_s")
    print("| members | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for combo in dict.fromkeys(r["members"] for r in rows):
        rs = [r for r in rows if r["members"] == combo]
        cells = [f"{np.mean([r[k] for r in rs]):.4f}" if rs[0].get(k) is not None else "" for k in keys]
        print(f"| {combo} | " + " | ".join(cells) + " |")
    if a.out:
        a.out.write_text(json.dumps({"data": a.data, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
