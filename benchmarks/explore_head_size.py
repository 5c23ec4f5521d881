"""Which stage-1 head for how many images (issue 12, "a head chosen for the data size").

On cached frozen features (the same cache as ``explore_heads.py``), for each task the
training split is subsampled to ``k`` images per class (``--per-class``; ``0`` = all),
a stratified 20 % of that is carved as validation, and these heads are fitted with
imgclf's own ``fit_head`` and the default recipe's stage-1 settings:

* ``recipe``: Linear 512 + ReLU + Dropout 0.5 + Linear N (today's default head);
* ``linear``: standardise + Dropout 0.5 + one Linear;
* ``auto``: whichever of the two has the lower temperature-calibrated validation log loss
  (what a validation-chosen head would deliver);
* ``recipe refit``: the recipe head retrained on train + validation for its best epoch
  count, with the temperature fitted on the carve model (refit lever);
* ``ensemble`` (``--ensemble``, several backbones): one recipe head per backbone on its
  own features, each calibrated on the carve, probabilities averaged (a probability
  ensemble instead of feature concatenation); its ``val_loss`` is the average's;
* ``heads K`` (``--heads K``): K recipe heads per backbone (seeds ``seed*100 + k``), each
  calibrated on the carve, all probabilities averaged (several heads on the same features).

Every head's logits get the temperature fitted on the validation carve
(:func:`imgclf.evaluation.calibration.fit_temperature`). Test metrics use the full
test split. Backbones: Lite0 alone, or Lite0+1+2 concatenated (``--backbones``).

    .venv/bin/python benchmarks/explore_head_size.py --out /tmp/hs/heads.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explore_heads import extract_all, image_lists, matrix, scores  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def subsample(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if per_class <= 0:
        return np.arange(len(y))
    return np.sort(np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]))


def carve(y: np.ndarray, fraction: float, seed: int):
    """Stratified carve with at least one validation image per class."""
    rng = np.random.default_rng(seed + 10_000)
    va = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        va.extend(idx[: max(1, round(fraction * len(idx)))])
    va = np.sort(np.array(va))
    return np.setdiff1d(np.arange(len(y)), va), va


def fit_logits(kind, x_tr, y_tr, x_va, y_va, x_te, n_classes, seed, **overrides):
    import torch

    from imgclf.config.recipes import make_settings
    from imgclf.train.heads import fit_head
    from imgclf.train.loops import TrainConfig

    cfg = TrainConfig.stage1(make_settings(seed=seed, head=kind, **overrides))
    head, _, summary = fit_head(x_tr.astype(np.float32), y_tr, x_va.astype(np.float32), y_va, n_classes, cfg)
    head.eval()
    with torch.no_grad():
        def logits(x):
            return head(torch.from_numpy(x.astype(np.float32))).numpy().astype(np.float64)
        return logits(x_va), logits(x_te), summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/research/cache"))
    ap.add_argument("--tasks", nargs="+", default=["flowers12", "isic8", "isic8-binary"])
    ap.add_argument("--per-class", nargs="+", type=int, default=[10, 25, 60, 0])
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--ensemble", action="store_true", help="also the per-backbone probability ensemble (needs 2+ --backbones)")
    ap.add_argument("--heads", type=int, default=0, help="also K recipe heads per backbone averaged (0: not measured)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    from scipy.special import softmax

    from imgclf.evaluation.calibration import fit_temperature

    tasks = {k: v for k, v in image_lists(a.data_root).items() if k in a.tasks}
    feats = extract_all(tasks, a.backbones, ["plain"], a.cache_dir, {})
    rows = []
    for name, task in tasks.items():
        (tr_paths, y_all), (te_paths, y_te) = task["train"], task["test"]
        n_classes = len(task["classes"])
        x_all = np.hstack([matrix(feats, bb, "plain", tr_paths) for bb in a.backbones])
        x_te = np.hstack([matrix(feats, bb, "plain", te_paths) for bb in a.backbones])
        for k in a.per_class:
            for seed in a.seeds:
                sub = subsample(y_all, k, seed)
                x, y = x_all[sub], y_all[sub]
                fit, va = carve(y, 0.2, seed)
                found = {}
                for kind in ("recipe", "linear"):
                    t0 = time.perf_counter()
                    lv, lt, summ = fit_logits(kind, x[fit], y[fit], x[va], y[va], x_te, n_classes, seed)
                    temp = fit_temperature(lv, y[va])
                    pv = softmax(lv / temp, 1)
                    val_loss = float(-np.mean(np.log(np.clip(pv[np.arange(len(va)), y[va]], 1e-12, None))))
                    found[kind] = (val_loss, softmax(lt / temp, 1), temp, summ["best_epoch"], time.perf_counter() - t0)
                for kind, (vl, p, temp, ep, secs) in found.items():
                    rows.append({"task": name, "per_class": k, "n_train": len(sub), "seed": seed, "head": kind, "val_loss": vl,
                                 "T": temp, "best_epoch": ep, "fit_s": round(secs, 2), **scores(y_te, p, n_classes)})
                pick = min(found, key=lambda h: found[h][0])
                rows.append({**rows[-2 if pick == "recipe" else -1], "head": "auto", "picked": pick})
                # refit: recipe head on fit+val for its best epoch count, the carve's temperature
                vl, _, temp, ep, _ = found["recipe"]
                _, lt, _ = fit_logits("recipe", x, y, x[va], y[va], x_te, n_classes, seed, epochs=max(1, ep), patience=0, checkpoint="last")
                rows.append({"task": name, "per_class": k, "n_train": len(sub), "seed": seed, "head": "recipe refit", "val_loss": vl,
                             "T": temp, "best_epoch": ep, **scores(y_te, softmax(lt / temp, 1), n_classes)})
                def averaged(label: str, seeds: list[int]) -> None:
                    """One recipe head per backbone and seed, each calibrated on the carve, probabilities averaged."""
                    pv_all, pt_all = [], []
                    for member_seed in seeds:
                        for bb in a.backbones:
                            xb, xb_te = matrix(feats, bb, "plain", tr_paths)[sub], matrix(feats, bb, "plain", te_paths)
                            lv, lt, _ = fit_logits("recipe", xb[fit], y[fit], xb[va], y[va], xb_te, n_classes, member_seed)
                            temp = fit_temperature(lv, y[va])
                            pv_all.append(softmax(lv / temp, 1))
                            pt_all.append(softmax(lt / temp, 1))
                    pv = np.mean(pv_all, 0)
                    vl = float(-np.mean(np.log(np.clip(pv[np.arange(len(va)), y[va]], 1e-12, None))))
                    rows.append({"task": name, "per_class": k, "n_train": len(sub), "seed": seed, "head": label, "val_loss": vl,
                                 **scores(y_te, np.mean(pt_all, 0), n_classes)})

                if a.ensemble and len(a.backbones) > 1:
                    averaged("ensemble", [seed])
                if a.heads:
                    averaged(f"heads {a.heads}", [seed * 100 + k_head for k_head in range(a.heads)])
                print(json.dumps({kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in rows[-1].items()}), flush=True)
        a.out.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(a).items()}}, indent=1))  # so far

    summary = {}
    for r in rows:
        key = f"{r['task']} k={r['per_class']} {r['head']}"
        summary.setdefault(key, []).append(r)
    print(f"{'configuration':40s} {'n':>3s} {'acc':>7s} {'bal':>7s} {'auc':>7s} {'ece':>7s} {'logloss':>8s} {'val':>7s}")
    for key, rs in summary.items():
        m = {f: np.mean([r.get(f, np.nan) for r in rs]) for f in ("accuracy", "balanced_accuracy", "roc_auc", "ece", "log_loss", "val_loss")}
        print(f"{key:40s} {len(rs):3d} {m['accuracy']:7.4f} {m['balanced_accuracy']:7.4f} {m['roc_auc']:7.4f} {m['ece']:7.4f} {m['log_loss']:8.4f} {m['val_loss']:7.4f}")
    a.out.write_text(json.dumps({"rows": rows, "args": {k: str(v) for k, v in vars(a).items()}}, indent=1))


if __name__ == "__main__":
    main()
