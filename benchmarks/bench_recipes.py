"""Compare training recipes (seed, fast, finetune, ensemble) on one dataset, per seed, each with its own
backbone (ensemble: efficientnet_lite0+lite1, fast: efficientnet_lite0_stages, the others efficientnet_lite0) unless ``--backbone`` names one.

Each recipe runs as a fresh ``imgclf train`` process with an empty feature cache, so wall
time includes extraction; peak memory is that process's max RSS. The seed also sets the
validation carve and the training order, so several seeds (``--seeds 0 1 2``) show how
much of a difference between recipes is noise; a mean row per recipe follows. Column
``stage2`` says whether fine-tuning replaced the frozen model (``kept frozen`` when it did
not beat it on validation); ``val_monitor`` is the kept model's temperature-calibrated
validation log loss (stage 2's monitor; the same validation images for every recipe of a seed). ``--data`` is a dataset folder or a manifest CSV (``path,label,split``,
e.g. ``../shared/data/isic8/binary.csv``). ``--variant NAME='ARGS'`` adds a run labelled NAME with
those ``imgclf train`` arguments (e.g. ``--variant "unfreeze3=--recipe finetune --unfreeze 3"``).
Prints a Markdown table (and JSON with --out). Usage:

    .venv/bin/python benchmarks/bench_recipes.py [--data ../shared/data/flowers12] [--backbone NAME] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_recipe(data: Path, recipe: str, backbone: str | None, seed: int, extra: list[str], workdir: Path) -> dict:
    """One ``imgclf train`` run labelled ``recipe``: the named recipe, or a variant whose ``extra``
    arguments name their own (``--recipe`` given in ``extra`` wins)."""
    cache = workdir / f"cache-{recipe}-{seed}"
    project = workdir / f"runs-{seed}"
    source = ["--manifest", str(data)] if data.suffix.lower() == ".csv" else [str(data)]
    named = [] if "--recipe" in extra else ["--recipe", recipe]
    cmd = [sys.executable, "-m", "imgclf", "-q", "train", *source, *named, *(["--backbone", backbone] if backbone else []),
           "--seed", str(seed), "--project", str(project), "--name", recipe, "--cache-dir", str(cache), "--no-progress", *extra]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    out, err = proc.communicate()
    rc = os.waitstatus_to_exitcode(status)
    row = {"recipe": recipe, "rc": rc, "wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    if rc != 0:
        row["error"] = (err.strip().splitlines() or ["?"])[-1]
        return row
    row["seed"] = seed
    m = json.loads((project / recipe / "test_metrics.json").read_text())
    summary = json.loads((project / recipe / "config.json").read_text()).get("fit_summary", {})
    stages = summary.get("stages", [])
    heads_kept = len(stages) > 1 and (stages[1].get("frozen_heads") or {}).get("kept")
    if heads_kept:  # --heads: the frozen heads beat the tuned model on the same calibrated loss
        row["val_monitor"] = stages[1]["frozen_heads"]["val_calibrated_loss"]
    elif stages and stages[-1].get("monitor") == "val_calibrated_loss":  # the kept model's, comparable across variants of one seed
        row["val_monitor"] = stages[-1].get("best_monitor")
    if summary.get("tta"):
        row["tta"] = summary["tta"]
    if len(stages) > 1:
        s2 = stages[1]
        row["stage2"] = "kept frozen" if s2.get("kept_start") or heads_kept else f"tuned (epoch {s2.get('best_epoch')})"
        row["stage2_img_s"] = s2.get("images_per_second")
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss", "ece"):
        row[key] = m.get(key)
    if m.get("at_threshold"):  # binary
        row["sensitivity"] = m["at_threshold"].get("sensitivity")
        row["specificity"] = m["at_threshold"].get("specificity")
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flowers12"))
    ap.add_argument("--backbone", default=None, help="one backbone for every recipe (default: each recipe's own)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--recipes", nargs="*", default=["seed", "fast", "finetune", "ensemble"], help="named recipes to run (none: only the --variant runs)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                    help="also run NAME with these imgclf train arguments (repeatable)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    ap.add_argument("--keep", default=None, help="keep the run folders under this folder (runs-SEED/RECIPE, with report.html) instead of a temporary one")
    args = ap.parse_args()
    runs = [(r, []) for r in args.recipes]
    for v in args.variant:
        name, sep, rest = v.partition("=")
        if not sep or not name:
            ap.error(f"--variant wants NAME=ARGS, got {v!r}")
        runs.append((name, shlex.split(rest)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="imgclf-bench-recipes-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)  # --keep: the run folders (runs-SEED/RECIPE) stay there
        for seed in args.seeds:
            for r, extra in runs:
                rows.append(run_recipe(Path(args.data), r, args.backbone, seed, extra, work))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    metrics = ["accuracy", "balanced_accuracy", "macro_f1", "roc_auc", "log_loss", "ece", "sensitivity", "specificity", "val_monitor", "wall_s",
               "peak_rss_mb"]
    if len(args.seeds) > 1:
        for r, _ in runs:
            ok = [x for x in rows if x["recipe"] == r and x["rc"] == 0]
            if ok:
                mean = {"recipe": r, "seed": "mean", "rc": 0}
                for c in metrics:
                    vals = [x[c] for x in ok if isinstance(x.get(c), int | float)]
                    if vals:
                        mean[c] = round(sum(vals) / len(vals), 4 if c not in ("wall_s", "peak_rss_mb") else 1)
                tuned = [x for x in ok if "stage2" in x]
                if tuned:
                    mean["stage2"] = f"tuned in {sum(x['stage2'].startswith('tuned') for x in tuned)}/{len(tuned)}"
                rows.append(mean)
    cols = ["recipe", "seed", *metrics[:9], "tta", "stage2", "stage2_img_s", "wall_s", "peak_rss_mb"]
    cols = [c for c in cols if any(c in r for r in rows)]
    print(f"dataset: {args.data}  backbone: {args.backbone or 'each recipe own'}  seeds: {' '.join(map(str, args.seeds))}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.4f}" if isinstance(v, float) and c not in ("wall_s", "peak_rss_mb", "stage2_img_s") else ("" if v is None else str(v)))
        print("| " + " | ".join(cells) + " |" + (f"  error: {r['error']}" if "error" in r else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
