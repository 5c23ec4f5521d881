"""Which pooled activations of a frozen EfficientNet-Lite carry the classes: the conv head's 1,280
channels (what a Lite entry pools) or the outputs of its stages (issue 12).

Step 1 runs each backbone named in ``--sets`` (L0, L1, L2: Lite0/1/2; PyTorch fp32, imgclf's
own preprocessing) once over every image of flowers12 and isic8 and keeps, per image: the conv
head's map average- and max-pooled, and the output of the last block of each of stages 1-7
average-pooled. Step 2 scores feature sets by 5-fold stratified cross-validation over all
labelled images of a task (train + test; the same folds for every set): per fold, a stratified
20 % of the training folds is carved for validation, ``--heads`` recipe heads (imgclf's
``fit_head``, the default stage-1 settings) train on the rest, their averaged probabilities get
one temperature fitted on the carve, and the held-out fold is scored; a pair (``L0+L1``)
averages the two backbones' calibrated probabilities. Feature sets: ``B|names`` with ``B`` one
of L0, L1, L2 or several joined by ``+``, and ``names`` joined by ``.`` from ``avg`` (conv
head, average), ``max`` (conv head, max), ``mK`` (the last K stages). Each group is centred and
scaled to unit RMS on the training folds (``--raw``: concatenated as they are, leaving it to
the head's own standardisation, as the product does).

    .venv/bin/python benchmarks/explore_stages.py --cache /tmp/stages \\
        --tasks isic8 isic8-binary flowers12 --sets "L0|avg" "L0|m4" "L0|avg.m4" "L0+L1|avg" "L0+L1|m4"
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explore_head_size import carve, fit_logits  # noqa: E402
from explore_heads import image_lists, scores  # noqa: E402

BACKBONES = {"L0": "efficientnet_lite0", "L1": "efficientnet_lite1", "L2": "efficientnet_lite2"}


def extract(name: str, paths: list[str], cache: Path) -> dict[str, np.ndarray]:
    """{"final_avg", "final_max", "s1".."s7"} → (n, C) for ``paths``, cached in ``cache``."""
    import torch

    from imgclf.backbones.modules import build_feature_extractor, lite_stage_ends
    from imgclf.backbones.specs import get_backbone_spec
    from imgclf.backbones.weights import resolve_weights
    from imgclf.data.preprocess import decode_array

    file = cache / f"{name}.npz"
    if file.exists():
        z = np.load(file)
        if list(z["paths"]) == paths:
            return {k: z[k] for k in z.files if k != "paths"}
    spec = get_backbone_spec(name)
    fx = build_feature_extractor(spec, resolve_weights(spec, "imagenet"))
    blocks = list(fx.body.net._blocks)
    ends = lite_stage_ends(fx.body.net)
    caught: dict[int, torch.Tensor] = {}
    for i in ends:
        blocks[i].register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(i, out))
    out: dict[str, list] = {k: [] for k in ["final_avg", "final_max", *(f"s{j + 1}" for j in range(len(ends)))]}
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, len(paths), 32):
            arrays = list(pool.map(lambda p: decode_array(p, spec.preprocessing)[0], paths[start:start + 32]))
            with torch.no_grad():
                fmap = fx.feature_map(torch.from_numpy(np.stack(arrays)))
            out["final_avg"].append(fmap.mean((2, 3)).numpy())
            out["final_max"].append(fmap.amax((2, 3)).numpy())
            for j, i in enumerate(ends):
                out[f"s{j + 1}"].append(caught[i].mean((2, 3)).numpy())
    print(f"{name}: {len(paths)} images in {time.perf_counter() - started:.0f} s", flush=True)
    feats = {k: np.concatenate(v) for k, v in out.items()}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(file, paths=np.array(paths), **feats)
    return feats


def columns(feats: dict[str, np.ndarray], names: list[str]) -> list[str]:
    stages = sorted((k for k in feats if k.startswith("s")), key=lambda k: int(k[1:]))
    picked = []
    for n in names:
        picked += {"avg": ["final_avg"], "max": ["final_max"]}.get(n) or stages[-int(n[1:]):]
    return picked


def features(groups: list[np.ndarray], train: np.ndarray, raw: bool) -> np.ndarray:
    if raw:
        return np.concatenate(groups, 1).astype(np.float32)
    scaled = []
    for g in groups:
        centred = g - g[train].mean(0)
        scaled.append(centred / np.sqrt((centred[train] ** 2).mean()))
    return np.concatenate(scaled, 1).astype(np.float32)


def averaged_and_calibrated(cal_logits: list, test_logits: list, y_cal: np.ndarray) -> np.ndarray:
    """Several heads' probabilities averaged (as ``ensemble_head`` averages), then one temperature
    fitted on the calibration images' averaged output: the held-out images' probabilities."""
    from scipy.special import softmax

    from imgclf.evaluation.calibration import fit_temperature

    def log_mean(logits):
        return np.log(np.mean([softmax(lg, 1) for lg in logits], 0) + 1e-12)

    return softmax(log_mean(test_logits) / fit_temperature(log_mean(cal_logits), y_cal), 1)


def calibrated_member(x, y, train, held_out, n_classes, seed, heads):
    """``heads`` recipe heads on ``train`` minus a carve; held-out probabilities with the carve's temperature."""
    fit, carve_idx = carve(y[train], 0.2, seed)
    tr, va = train[fit], train[carve_idx]
    logits = [fit_logits("recipe", x[tr], y[tr], x[va], y[va], x[held_out], n_classes, seed * 100 + k)[:2] for k in range(heads)]
    return averaged_and_calibrated([lv for lv, _ in logits], [lt for _, lt in logits], y[va])


def labelled_images(data: Path) -> tuple[list[str], dict]:
    """Every image of flowers12 and isic8 once (sorted paths), and per task the rows of its
    labelled images (train + test) in that list, their labels and the class count."""
    tasks = image_lists(data)
    paths = sorted({p for t in tasks.values() for s in ("train", "test") for p in t[s][0]})
    row_of = {p: i for i, p in enumerate(paths)}
    return paths, {name: (np.array([row_of[p] for p in t["train"][0] + t["test"][0]]), np.concatenate([t["train"][1], t["test"][1]]), len(t["classes"]))
                   for name, t in tasks.items()}


def metric_cells(s: dict) -> str:
    """accuracy | balanced acc | ROC-AUC (binary only) | log loss | ECE, as Markdown cells."""
    auc = f"{s['roc_auc']:.4f}" if "roc_auc" in s else ""
    return f"{s['accuracy']:.4f} | {s['balanced_accuracy']:.4f} | {auc} | {s['log_loss']:.4f} | {s['ece']:.4f}"


def main() -> None:
    from sklearn.model_selection import StratifiedKFold

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--cache", type=Path, required=True, help="where the pooled activations are kept between runs")
    ap.add_argument("--tasks", nargs="+", default=["isic8", "isic8-binary", "flowers12"])
    ap.add_argument("--sets", nargs="+", default=["L0|avg", "L0|m4", "L0|avg.m4", "L0+L1|avg", "L0+L1|m4"])
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--raw", action="store_true", help="no per-group scaling (the product's own standardisation only)")
    args = ap.parse_args()

    paths, tasks = labelled_images(args.data)
    used = {b for name in args.sets for b in name.split("|")[0].split("+")}
    feats = {b: extract(name, paths, args.cache) for b, name in BACKBONES.items() if b in used}
    print("| task | features | accuracy | balanced acc | ROC-AUC | log loss | ECE |\n|---|---|---|---|---|---|---|")
    for task in args.tasks:
        rows, y, n_classes = tasks[task]
        for name in args.sets:
            members, names = name.split("|")
            oof = np.zeros((len(y), n_classes))
            for fold, (train, held_out) in enumerate(StratifiedKFold(5, shuffle=True, random_state=0).split(rows, y)):
                probs = []
                for b in members.split("+"):
                    x = features([feats[b][c][rows] for c in columns(feats[b], names.split("."))], train, args.raw)
                    probs.append(calibrated_member(x, y, train, held_out, n_classes, fold, args.heads))
                oof[held_out] = np.mean(probs, 0)
            print(f"| {task} | {name.replace('|', ' ')} | {metric_cells(scores(y, oof, n_classes))} |", flush=True)


if __name__ == "__main__":
    main()
