"""Accuracy and calibration levers on frozen features (issue 12): which head, backbones,
class weighting, C selection, calibration and view augmentation reach the targets.

Features come from imgclf's own extraction (``Classifier.features``: the registry's
preprocessing, the fastest engine, the checksummed cache) into a separate cache folder,
so a first run measures cold extraction speed per backbone and later runs only re-fit heads.

Candidates (every choice made on train only; test is touched once per fitted model):

* ``mlp``: the current default head (``fit_head`` with ``TrainConfig.stage1`` of the
  default settings) on a seeded stratified validation carve (``val_fraction`` of train).
* ``lr``: multinomial L2 logistic regression on standardised features, C chosen by
  inner stratified 3-fold CV on train (balanced accuracy for multi-class, log loss for
  binary), with or without ``class_weight='balanced'``; refit on all of train
  (``norefit``: fitted on the validation carve's complement only).
* ``cat``: Lite0+1+2 features concatenated (each standardised); ``lr avg`` (``--with-avg``):
  the mean of per-backbone LR probabilities.
* ``+aug``: trained on plain and hflip views; ``+tta``: test probabilities averaged over
  plain and hflip views.
* calibration: ``raw``; ``ts-val``: temperature fitted on a validation carve (model
  fitted on the rest, not refitted); ``ts-oof``: temperature fitted on out-of-fold
  probabilities of train, model refitted on all of train. T bounded to [0.05, 20].

Run from the repository root (the whole grid takes about an hour on 2 busy cores;
``--tasks``, ``--seeds``, ``--lr-seeds``, ``--c-from`` and ``--flip-backbones`` cut it up):
    .venv/bin/python benchmarks/explore_heads.py --out /tmp/research/heads.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
T_BOUNDS = (0.05, 20.0)
C_GRID = (0.01, 0.03, 0.1, 0.3)


# ----------------------------------------------------------------------------- data + features


def image_lists(data_root: Path) -> dict:
    """task -> {"train": (paths, labels), "test": (paths, labels), "classes": [...]}: flowers12
    and isic8 from their folders, isic8-binary from binary.csv (the same images)."""
    from imgclf.data.datasets import load_dataset, load_manifest

    tasks = {}
    for name in ("flowers12", "isic8"):
        ds = load_dataset(data_root / name, val_fraction=0.0, test_fraction=0.0)
        tasks[name] = {
            split: ([str(s.path) for s in ds.samples[split]], np.array([s.label for s in ds.samples[split]])) for split in ("train", "test")
        } | {"classes": list(ds.class_names)}
    ds = load_manifest(data_root / "isic8" / "binary.csv", val_fraction=0.0, test_fraction=0.0)
    tasks["isic8-binary"] = {
        split: ([str(s.path) for s in ds.samples[split]], np.array([s.label for s in ds.samples[split]])) for split in ("train", "test")
    } | {"classes": list(ds.class_names)}
    return tasks


def extract_all(tasks: dict, backbones, views, cache_dir: Path, speed: dict, flip_backbones=None) -> dict:
    """(backbone, view, path) features for every image of every task, through imgclf's cache."""
    from imgclf.data.augment import FixedView
    from imgclf.engines.extract import extract_features
    from imgclf.model.classifier import Classifier

    paths = sorted({p for t in tasks.values() for s in ("train", "test") for p in t[s][0]})
    feats = {}
    for bb in backbones:
        runner = Classifier(bb, cache_dir=cache_dir).backbone_runner()
        for view in views:
            if view != "plain" and flip_backbones is not None and bb not in flip_backbones:
                continue
            transform = None if view == "plain" else FixedView(view)
            t = time.perf_counter()
            res = extract_features(paths, runner, transform=transform)
            if res.errors:
                raise SystemExit(f"{bb} {view}: {len(res.errors)} unreadable images, e.g. {next(iter(res.errors.values()))}")
            if res.computed:
                speed[f"{bb}/{view}"] = {
                    "images": res.computed, "seconds": round(res.seconds, 2), "img_per_s": round(res.images_per_second, 2),
                    "wall_incl_hash_and_load_s": round(time.perf_counter() - t, 2), "engine": res.engine, "precision": res.precision,
                }
                print(f"extracted {bb} {view}: {res.computed} images at {res.images_per_second:.1f} img/s ({res.engine}, {res.precision})", flush=True)
            feats[(bb, view)] = dict(zip(paths, res.features))
    return feats


def matrix(feats, bb, view, paths) -> np.ndarray:
    return np.stack([feats[(bb, view)][p] for p in paths]).astype(np.float64)


# ----------------------------------------------------------------------------- metrics + calibration


def scores(y, probs, n_classes: int) -> dict:
    from sklearn.metrics import roc_auc_score

    from imgclf.evaluation.metrics import calibration_bins

    pred = probs.argmax(1)
    recalls = [float(np.mean(pred[y == c] == c)) for c in range(n_classes) if np.any(y == c)]
    out = {"accuracy": float(np.mean(pred == y)), "balanced_accuracy": float(np.mean(recalls)), "ece": calibration_bins(y, probs)["ece"]}
    out["log_loss"] = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None))))
    if n_classes == 2:
        out["roc_auc"] = float(roc_auc_score(y, probs[:, 1]))
    return out


def fit_temperature(probs, y) -> float:
    """One temperature minimising NLL of softmax(log p / T), T in T_BOUNDS (bounded, so a
    perfectly separated validation set cannot send it to 0)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logp = np.log(np.clip(probs, 1e-300, None))
    idx = np.arange(len(y))
    res = minimize_scalar(lambda lt: float(-log_softmax(logp / math.exp(lt), axis=1)[idx, y].mean()),
                          bounds=tuple(math.log(b) for b in T_BOUNDS), method="bounded", options={"xatol": 1e-5})
    return math.exp(res.x)


def apply_temperature(probs, t: float) -> np.ndarray:
    from scipy.special import softmax

    return softmax(np.log(np.clip(probs, 1e-300, None)) / t, axis=1)


# ----------------------------------------------------------------------------- heads


class Standardised:
    """Per-block standardisation (train mean, per-feature std), blocks = backbones, so the
    concatenation gives each backbone the same weight."""

    def fit(self, blocks):
        self.stats = [(b.mean(0), b.std(0) + 1e-6) for b in blocks]
        return self

    def __call__(self, blocks):
        return np.hstack([(b - m) / s for b, (m, s) in zip(blocks, self.stats)])


LR_TOL = [1e-3]  # set from --lr-tol


def lr_model(c: float, balanced: bool, seed: int, warm: bool = False):
    """sklearn multinomial L2 logistic regression (lbfgs). The default tolerance (--lr-tol
    1e-3) keeps a fit to seconds on 2 shared cores but stops short of the optimum at larger
    C; a small --lr-tol gives the exact optimum at several times the cost."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, tol=LR_TOL[0], max_iter=5000, class_weight="balanced" if balanced else None,
                              random_state=seed, warm_start=warm)


def choose_c(x, y, balanced: bool, seed: int, n_classes: int, groups_view: int = 1, folds: int = 3) -> float:
    """C by inner stratified CV on ``x`` (train only): balanced accuracy (multi-class; ties
    broken by log loss) or log loss (binary). With ``groups_view`` > 1 the rows are views
    stacked [view0; view1; ...] of the same images, and folds split images, not rows.
    One warm-started model per fold walks the C grid upwards (the cheap direction)."""
    from sklearn.model_selection import StratifiedKFold

    n = len(y) // groups_view
    score = np.zeros((len(C_GRID), 2))
    for tr, va in StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(n), y[:n]):
        tr_rows = np.concatenate([tr + k * n for k in range(groups_view)])
        m = lr_model(C_GRID[0], balanced, seed, warm=True)
        for i, c in enumerate(C_GRID):
            m.set_params(C=c).fit(x[tr_rows], y[tr_rows])
            p = m.predict_proba(x[va])
            pred = p.argmax(1)
            bal = np.mean([np.mean(pred[y[va] == k] == k) for k in range(n_classes) if np.any(y[va] == k)])
            score[i] += (bal, -np.mean(np.log(np.clip(p[np.arange(len(va)), y[va]], 1e-12, None))))
    if n_classes == 2:
        return C_GRID[int(np.argmax(score[:, 1]))]
    return C_GRID[max(range(len(C_GRID)), key=lambda i: (round(score[i, 0] / folds, 3), score[i, 1]))]


def oof_probs(make, x, y, seed: int, groups_view: int = 1) -> np.ndarray:
    """Out-of-fold probabilities on the plain rows (first n of ``x``) by stratified 5-fold."""
    from sklearn.model_selection import StratifiedKFold

    n = len(y) // groups_view
    out = None
    for tr, va in StratifiedKFold(5, shuffle=True, random_state=seed + 1000).split(np.zeros(n), y[:n]):
        tr_rows = np.concatenate([tr + k * n for k in range(groups_view)])
        p = make().fit(x[tr_rows], y[tr_rows]).predict_proba(x[va])
        if out is None:
            out = np.zeros((n, p.shape[1]))
        out[va] = p
    return out


def stratified_carve(y, fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    return train_test_split(idx, test_size=fraction, stratify=y, random_state=seed)


def mlp_probs(x_tr, y_tr, x_va, y_va, x_te_views, n_classes, seed):
    """The current default head: fit_head with the default recipe's stage-1 config."""
    import torch

    from imgclf.config.recipes import make_settings
    from imgclf.train.heads import fit_head
    from imgclf.train.loops import TrainConfig

    cfg = TrainConfig.stage1(make_settings(seed=seed))
    head, _, summary = fit_head(x_tr.astype(np.float32), y_tr, x_va.astype(np.float32), y_va, n_classes, cfg)
    with torch.no_grad():
        def proba(x):
            return torch.softmax(head(torch.from_numpy(x.astype(np.float32))), 1).numpy().astype(np.float64)
        return proba(x_va), [proba(x) for x in x_te_views], summary


# ----------------------------------------------------------------------------- one task, one seed


def run_task(task: dict, feats, backbones, seed: int, val_fraction: float, with_cv: bool, do_lr: bool, c_cache: dict,
             with_avg: bool) -> list[dict]:
    """Every candidate on one task for one seed. ``c_cache``: C per LR configuration, chosen
    by inner CV the first time (train only) and reused for the other seeds (and for the
    same configuration trained on plain+hflip views)."""
    tr_paths, y_tr = task["train"]
    te_paths, y_te = task["test"]
    n_classes = len(task["classes"])
    rows = []

    def X(bbs, view, paths):
        return [matrix(feats, bb, view, paths) for bb in bbs]

    def has_flip(bbs) -> bool:
        return all((bb, "hflip") in feats for bb in bbs)

    va_idx_split = stratified_carve(y_tr, val_fraction, seed)
    fit_idx, va_idx = va_idx_split

    def record(name, probs_by_cal, seconds, extra=None):
        for cal, probs in probs_by_cal.items():
            r = {"candidate": name, "calibration": cal, "seed": seed, "head_fit_s": round(seconds, 3), **scores(y_te, probs, n_classes)}
            rows.append(r | (extra or {}))

    # ---- current MLP head (default recipe stage 1), lite0 and lite0+1+2 concatenated
    for label, bbs in (("mlp lite0", backbones[:1]), ("mlp cat", backbones)):
        tr_blocks = X(bbs, "plain", tr_paths)
        x_tr_all = np.hstack(tr_blocks)
        te_views = [np.hstack(X(bbs, "plain", te_paths))] + ([np.hstack(X(bbs, "hflip", te_paths))] if has_flip(bbs) else [])
        t = time.perf_counter()
        p_va, p_te_views, _ = mlp_probs(x_tr_all[fit_idx], y_tr[fit_idx], x_tr_all[va_idx], y_tr[va_idx], te_views, n_classes, seed)
        secs = time.perf_counter() - t
        temp = fit_temperature(p_va, y_tr[va_idx])
        for tta in ([False, True] if has_flip(bbs) else [False]):
            p_te = np.mean(p_te_views if tta else p_te_views[:1], 0)
            record(label + (" +tta" if tta else ""), {"raw": p_te, "ts-val": apply_temperature(p_te, temp)}, secs, {"T": temp})

    # ---- logistic regression variants
    configs = [("lr lite0", backbones[:1], False), ("lr lite0 bal", backbones[:1], True),
               ("lr cat", backbones, False), ("lr cat bal", backbones, True)]
    imbalanced = np.bincount(y_tr).max() > 1.5 * np.bincount(y_tr).min()
    for label, bbs, balanced in configs if do_lr else []:
        if balanced and not imbalanced:
            continue  # class_weight='balanced' is (nearly) the identity here
        for aug in ([False, True] if has_flip(bbs) else [False]):
            tr_views = [X(bbs, "plain", tr_paths)] + ([X(bbs, "hflip", tr_paths)] if aug else [])
            te_views = [X(bbs, "plain", te_paths)] + ([X(bbs, "hflip", te_paths)] if has_flip(bbs) else [])
            t = time.perf_counter()
            std = Standardised().fit([np.vstack([v[k] for v in tr_views]) for k in range(len(bbs))])
            x_tr = np.vstack([std(v) for v in tr_views])
            y_rows = np.concatenate([y_tr] * len(tr_views))
            if label not in c_cache:
                c_cache[label] = choose_c(x_tr, y_rows, balanced, seed, n_classes, groups_view=len(tr_views))
            c = c_cache[label]
            model = lr_model(c, balanced, seed).fit(x_tr, y_rows)
            secs_fit = time.perf_counter() - t
            p_oof = oof_probs(lambda: lr_model(c, balanced, seed), x_tr, y_rows, seed, groups_view=len(tr_views))
            t_oof = fit_temperature(p_oof, y_tr)
            secs_oof = time.perf_counter() - t
            # validation-carve variant: fit on the rest, T on the carve, no refit
            rows_fit = np.concatenate([fit_idx + k * len(y_tr) for k in range(len(tr_views))])
            m_val = lr_model(c, balanced, seed).fit(x_tr[rows_fit], y_rows[rows_fit])
            t_val = fit_temperature(m_val.predict_proba(x_tr[va_idx]), y_tr[va_idx])
            name = label + (" +aug" if aug else "")
            for tta in ([False, True] if has_flip(bbs) else [False]):
                used = te_views if tta else te_views[:1]
                p_te = np.mean([model.predict_proba(std(v)) for v in used], 0)
                p_te_val = np.mean([m_val.predict_proba(std(v)) for v in used], 0)
                extra = {"C": c, "T_oof": t_oof, "T_val": t_val, "oof_balanced_accuracy": scores(y_tr, p_oof, n_classes)["balanced_accuracy"]}
                nm = name + (" +tta" if tta else "")
                record(nm, {"raw": p_te, "ts-oof": apply_temperature(p_te, t_oof)}, secs_oof, extra)
                record(nm + " norefit", {"raw": p_te_val, "ts-val": apply_temperature(p_te_val, t_val)}, secs_fit, extra)

    # ---- probability averaging of per-backbone LR models (plain views, no TTA)
    for balanced in ((False, True) if imbalanced else (False,)) if do_lr and with_avg else ():
        t = time.perf_counter()
        per_te, per_oof = [], []
        for bb in backbones:
            std = Standardised().fit(X([bb], "plain", tr_paths))
            x_tr = std(X([bb], "plain", tr_paths))
            key = f"{bb} {balanced}"
            if key not in c_cache:
                c_cache[key] = choose_c(x_tr, y_tr, balanced, seed, n_classes)
            c = c_cache[key]
            per_te.append(lr_model(c, balanced, seed).fit(x_tr, y_tr).predict_proba(std(X([bb], "plain", te_paths))))
            per_oof.append(oof_probs(lambda: lr_model(c, balanced, seed), x_tr, y_tr, seed))
        p_oof = np.mean(per_oof, 0)
        t_oof = fit_temperature(p_oof, y_tr)
        p_te = np.mean(per_te, 0)
        record("lr avg" + (" bal" if balanced else ""), {"raw": p_te, "ts-oof": apply_temperature(p_te, t_oof)}, time.perf_counter() - t,
               {"T_oof": t_oof, "oof_balanced_accuracy": scores(y_tr, p_oof, n_classes)["balanced_accuracy"]})

    # ---- 5-fold CV balanced accuracy on train (the second isic8 target): chosen candidates
    if with_cv:
        cv_mlp = cv_mlp_on_train(task, feats, backbones, seed)
        for r in rows:
            key = r["candidate"].replace(" norefit", "").replace(" +tta", "")
            if key in cv_mlp:
                r["cv5_balanced_accuracy"] = cv_mlp[key]
            elif "oof_balanced_accuracy" in r:  # LR: the out-of-fold predictions are a 5-fold CV on train
                r["cv5_balanced_accuracy"] = r["oof_balanced_accuracy"]
    return rows


def cv_mlp_on_train(task, feats, backbones, seed) -> dict:
    """5-fold stratified CV on train of the MLP head (each fold carves its own validation
    split for early stopping), balanced accuracy of the pooled out-of-fold predictions."""
    from sklearn.model_selection import StratifiedKFold

    tr_paths, y = task["train"]
    n_classes = len(task["classes"])
    out = {}
    folds = list(StratifiedKFold(5, shuffle=True, random_state=seed + 1000).split(np.zeros(len(y)), y))
    for name, bbs in {"mlp lite0": backbones[:1], "mlp cat": backbones}.items():
        x = np.hstack([matrix(feats, bb, "plain", tr_paths) for bb in bbs])
        pred = np.zeros(len(y), int)
        for tr, va in folds:
            fi, vi = stratified_carve(y[tr], 0.2, seed)
            _, p, _ = mlp_probs(x[tr][fi], y[tr][fi], x[tr][vi], y[tr][vi], [x[va]], n_classes, seed)
            pred[va] = p[0].argmax(1)
        out[name] = float(np.mean([np.mean(pred[y == k] == k) for k in range(n_classes)]))
    return out


# ----------------------------------------------------------------------------- summary


def summarise(rows: list[dict]) -> list[dict]:
    keys = ("accuracy", "balanced_accuracy", "roc_auc", "ece", "log_loss", "cv5_balanced_accuracy", "head_fit_s")
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["task"], r["candidate"], r["calibration"]), []).append(r)
    out = []
    for (task, cand, cal), rs in groups.items():
        s = {"task": task, "candidate": cand, "calibration": cal, "seeds": len(rs)}
        for k in keys:
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals:
                s[k] = float(np.mean(vals))
                s[k + "_sd"] = float(np.std(vals))
        out.append(s)
    return out


def markdown(summary: list[dict]) -> str:
    lines = []
    for task in dict.fromkeys(s["task"] for s in summary):
        lines += [f"\n### {task}\n", "| candidate | cal | acc | bal acc | AUC | ECE | CV5 bal acc | fit s |", "|---|---|---|---|---|---|---|---|"]
        for s in (s for s in summary if s["task"] == task):
            def f(k, d=3):
                return f"{s[k]:.{d}f}" if k in s else "–"
            lines.append(f"| {s['candidate']} | {s['calibration']} | {f('accuracy')} | {f('balanced_accuracy')} | {f('roc_auc')} | {f('ece')} | "
                         f"{f('cv5_balanced_accuracy')} | {f('head_fit_s', 1)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data", help="folder holding flowers12/ and isic8/ (default: ../shared/data from the repo root)")
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/research/cache"), help="feature cache folder (kept apart from the user cache)")
    ap.add_argument("--tasks", nargs="+", default=["flowers12", "isic8", "isic8-binary"], choices=["flowers12", "isic8", "isic8-binary"])
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    ap.add_argument("--views", nargs="+", default=["plain", "hflip"], choices=["plain", "hflip"], help="feature views to extract (hflip enables +aug/+tta)")
    ap.add_argument("--flip-backbones", nargs="+", default=None, help="backbones whose hflip view is extracted (default: all); +aug/+tta candidates need every backbone they use")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--lr-seeds", nargs="+", type=int, default=None, help="seeds for the LR candidates (default: --seeds); LR refitted on all of train depends on the seed only through its OOF folds")
    ap.add_argument("--c-from", type=Path, default=None, help="reuse the C per LR configuration recorded in an earlier --out JSON (skips the inner CV)")
    ap.add_argument("--lr-tol", type=float, default=1e-3, help="sklearn tolerance of the LR fits (1e-3: fast, not fully converged at larger C)")
    ap.add_argument("--with-avg", action="store_true", help="also per-backbone LR probability averaging")
    ap.add_argument("--no-cv", action="store_true", help="skip the 5-fold CV on train (isic8 tasks)")
    ap.add_argument("--extract-only", action="store_true")
    ap.add_argument("--out", type=Path, required=True, help="JSON file: per-seed rows, summary, extraction speed")
    args = ap.parse_args(argv)
    if not (args.data_root / "isic8").is_dir() or not (args.data_root / "flowers12").is_dir():
        print(f"error: {args.data_root} has no flowers12/ and isic8/ folders (see --data-root)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    LR_TOL[0] = args.lr_tol
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    tasks = image_lists(args.data_root)
    speed: dict = {}
    feats = extract_all({k: tasks[k] for k in args.tasks}, args.backbones, args.views, args.cache_dir, speed, args.flip_backbones)
    result = {"extraction": speed, "args": {k: str(v) for k, v in vars(args).items()}}
    from imgclf.fileio import write_json

    if not args.extract_only:
        rows = []
        lr_seeds = args.seeds if args.lr_seeds is None else args.lr_seeds
        for name in args.tasks:
            c_cache: dict = {}
            if args.c_from is not None:
                c_cache = {r["candidate"]: r["C"] for r in json.loads(args.c_from.read_text())["rows"] if r["task"] == name and "C" in r}
            for seed in args.seeds:
                t = time.perf_counter()
                for r in run_task(tasks[name], feats, args.backbones, seed, args.val_fraction, with_cv=not args.no_cv and name == "isic8",
                                  do_lr=seed in lr_seeds, c_cache=c_cache, with_avg=args.with_avg):
                    rows.append({"task": name} | r)
                print(f"{name} seed {seed}: {time.perf_counter() - t:.0f} s", flush=True)
                partial = {**result, "rows": rows, "summary": summarise(rows)}
                write_json(args.out, partial)
        result["rows"], result["summary"] = rows, summarise(rows)
        print(markdown(result["summary"]))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
