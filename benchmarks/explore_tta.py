"""Does test-time augmentation pay for the default recipe, and would validation pick it?

For each dataset and seed: train the default recipe once (API, fresh cache), then compute the
head's logits for every view of `--tta d4` (6: identity, flips, quarter turns) of the validation and test
images through the trained (possibly tuned) backbone. For each candidate view set (``none``,
``hflip``, ``flips``, ``d4``) the script fits the temperature on validation (as ``fit`` does for
the model's ``tta``), chooses the binary threshold on validation (the model's policy) and
scores validation (calibrated log loss: what a validation-based choice would see) and test.
Column ``auto_pick`` marks what ``--tta auto`` would choose (its rule, from the rounded losses).

    .venv/bin/python benchmarks/explore_tta.py --data ../shared/data/isic8/binary.csv --seeds 0 1 2 --out /tmp/tta.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CANDIDATES = {"none": ("identity",), "hflip": ("identity", "hflip"), "flips": ("identity", "hflip", "vflip", "rot180")}


def view_logits(clf, samples, names) -> tuple[np.ndarray, np.ndarray, dict]:
    """(V, n, C) head logits (temperature of the trained model divided out) and labels, plus seconds per view."""
    import torch

    from imgclf.data.augment import FixedView

    paths = [str(s.path) for s in samples]
    y_all = np.array([s.label for s in samples])
    x0, ok, _ = clf.features(paths, desc="plain")
    xs, secs = [x0], {"identity": 0.0}
    for name in names[1:]:
        t = time.perf_counter()
        xs.append(clf._aligned_view(paths, ok, x0, FixedView(name), name))
        secs[name] = time.perf_counter() - t
    t0 = clf.temperature_ or 1.0
    with torch.no_grad():
        logits = np.stack([clf.head_(torch.from_numpy(x)).double().numpy() * t0 for x in xs])
    return logits, y_all[ok], secs


def score(logits_val, y_val, logits_test, y_test, class_names, policy, clean=None) -> dict:
    from imgclf.evaluation.calibration import fit_temperature, view_mean_log_probs
    from imgclf.evaluation.metrics import classification_metrics
    from imgclf.evaluation.thresholds import choose_threshold, parse_policy

    t = fit_temperature(logits_val, y_val)
    lp_val = view_mean_log_probs(logits_val, t)
    p_val, p_test = np.exp(lp_val), np.exp(view_mean_log_probs(logits_test, t))
    threshold = None
    if len(class_names) == 2 and parse_policy(policy)[0] != "fixed":
        threshold = choose_threshold(y_val, p_val[:, 1], policy)
    m = classification_metrics(y_test, p_test, class_names, threshold=threshold, bootstrap=0)
    out = {"temperature": round(t, 4), "val_log_loss": round(float(-lp_val[np.arange(len(y_val)), y_val].mean()), 4),
           "val_accuracy": round(float((p_val.argmax(1) == y_val).mean()), 4)}
    for k in ("accuracy", "balanced_accuracy", "roc_auc", "log_loss", "ece"):
        if m.get(k) is not None:
            out[k] = round(float(m[k]), 4)
    if threshold is not None:
        a = m["at_threshold"]
        out["accuracy_at_threshold"] = round((a["tp"] + a["tn"]) / len(y_test), 4)
    if clean is not None and not clean.all():  # test images without an identical picture among train/validation
        mc = classification_metrics(y_test[clean], p_test[clean], class_names, threshold=threshold, bootstrap=0)
        out["clean_n"] = int(clean.sum())
        for k in ("accuracy", "balanced_accuracy", "roc_auc"):
            if mc.get(k) is not None:
                out["clean_" + k] = round(float(mc[k]), 4)
    return out


def run(data: Path, seed: int, work: Path) -> list[dict]:
    from imgclf import ImageClassifier
    from imgclf.data.augment import TTA_PRESETS
    from imgclf.data.datasets import load_dataset, load_manifest

    clf = ImageClassifier(seed=seed, cache_dir=str(work / f"cache-{seed}"), progress=False)
    st = clf.settings
    ds = (load_manifest(data, val_fraction=st.val_fraction, test_fraction=st.test_fraction, seed=seed) if data.suffix == ".csv"
          else load_dataset(data, val_fraction=st.val_fraction, test_fraction=st.test_fraction, seed=seed))
    t = time.perf_counter()
    clf.fit(ds)
    fit_s = time.perf_counter() - t
    names = TTA_PRESETS["d4"]
    lv, yv, sv = view_logits(clf, ds.samples["validation"], names)
    lt, yt, stt = view_logits(clf, ds.samples["test"], names)
    tuned = clf._tuned is not None
    from imgclf.fileio import content_hash

    seen = {content_hash(s.path) for split in ("train", "validation") for s in ds.samples[split]}
    _, ok_test, _ = clf.features([str(s.path) for s in ds.samples["test"]], desc="plain")
    clean = np.array([content_hash(ds.samples["test"][i].path) not in seen for i in ok_test])
    rows = []
    for cand, views in {**CANDIDATES, "d4": names}.items():
        idx = [names.index(v) for v in views]
        r = score(lv[idx], yv, lt[idx], yt, clf.class_names_, st.threshold_policy, clean)
        rows.append({"data": data.name, "seed": seed, "tta": cand, "tuned": tuned, "fit_s": round(fit_s, 1),
                     "extra_view_s_per_image": round(sum(stt[v] for v in views[1:]) / max(len(yt), 1), 4), **r})
    from imgclf.config.settings import TTA_AUTO_CANDIDATES, TTA_AUTO_MARGIN

    loss = {r["tta"]: r["val_log_loss"] for r in rows if r["tta"] in TTA_AUTO_CANDIDATES}  # the rule of --tta auto
    pick = next(n for n in TTA_AUTO_CANDIDATES if loss[n] <= min(loss.values()) + TTA_AUTO_MARGIN)
    for r in rows:
        r["auto_pick"] = r["tta"] == pick
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="explore-tta-") as tmp:
        for seed in args.seeds:
            rows += run(args.data, seed, Path(tmp))
            for r in rows[-4:]:
                print(json.dumps(r), flush=True)
            if args.out:
                args.out.write_text(json.dumps(rows, indent=1))
    keys = ("accuracy", "balanced_accuracy", "roc_auc", "log_loss", "ece", "val_log_loss", "clean_accuracy", "clean_roc_auc")
    auto = [r for r in rows if r["auto_pick"]]
    print("\n| tta | " + " | ".join(keys) + " | picked by auto |")
    print("|---|" + "---|" * (len(keys) + 1))
    for cand in (*CANDIDATES, "d4"):
        sel = [r for r in rows if r["tta"] == cand]
        means = [np.mean([r[k] for r in sel if r.get(k) is not None]) if any(r.get(k) is not None for r in sel) else float("nan") for k in keys]
        print(f"| {cand} | " + " | ".join(f"{m:.4f}" for m in means) + f" | {sum(r['auto_pick'] for r in sel)}/{len(sel)} |")
    means = [np.mean([r[k] for r in auto if r.get(k) is not None]) if any(r.get(k) is not None for r in auto) else float("nan") for k in keys]
    print("| auto (its pick per seed) | " + " | ".join(f"{m:.4f}" for m in means) + " | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
