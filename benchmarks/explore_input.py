"""Which input view feeds the frozen Lite stage features best (issue 12): the entry's own
centre crop (resize the shorter side to size / 0.875, cut the central square) against the
whole image (crop fraction 1) and larger input sizes.

Step 1 runs each view named in ``--sets`` once over every image of flowers12 and isic8 through
imgclf's own extraction (``BackboneRunner`` + ``extract_features``: OpenVINO bf16 where the CPU
has it, no feature cache) with the registry entry's preprocessing changed only in
``input_size`` and ``resize_size``. Step 2 scores feature sets by 5-fold stratified
cross-validation over all labelled images of a task (train + test), exactly as
``explore_stages.py`` does (recipe heads on a carve's complement, a temperature on the carve,
a pair's calibrated probabilities averaged; the same folds for every set).

A view is ``B@SIZE/CROP`` with ``B`` one of L0, L1, L2 (their ``_stages`` entries), e.g.
``L0@224/0.875`` (Lite0's own view) or ``L0@288/1``; a set joins views with ``+``:

    .venv/bin/python benchmarks/explore_input.py --cache /tmp/views \\
        --sets "L0@224/0.875" "L0@224/1" "L0@288/0.875" "L0@224/0.875+L1@240/0.875"
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from explore_heads import scores  # noqa: E402
from explore_stages import calibrated_member, labelled_images, metric_cells  # noqa: E402

ENTRIES = {"L0": "efficientnet_lite0_stages", "L1": "efficientnet_lite1_stages", "L2": "efficientnet_lite2_stages"}


def parse_view(view: str) -> tuple[str, int, float]:
    b, rest = view.split("@")
    size, crop = rest.split("/")
    return ENTRIES[b], int(size), float(crop)


def extract(view: str, paths: list[str], cache: Path) -> np.ndarray:
    """(n, features) of ``view`` for ``paths``, kept in ``cache`` between runs."""
    from imgclf.backbones.specs import get_backbone_spec
    from imgclf.backbones.weights import resolve_weights
    from imgclf.engines.extract import extract_features
    from imgclf.engines.runner import BackboneRunner

    file = cache / (view.replace("@", "_").replace("/", "_") + ".npz")
    if file.exists():
        z = np.load(file)
        if list(z["paths"]) == paths:
            return z["x"]
    name, size, crop = parse_view(view)
    spec = get_backbone_spec(name)
    prep = dataclasses.replace(spec.preprocessing, input_size=size, resize_size=int(round(size / crop)))
    spec = dataclasses.replace(spec, preprocessing=prep)
    with tempfile.TemporaryDirectory() as tmp:
        runner = BackboneRunner(spec, resolve_weights(spec, "imagenet"), Path(tmp))
        started = time.perf_counter()
        result = extract_features(paths, runner, use_cache=False)
        took = time.perf_counter() - started
    if result.errors:
        raise SystemExit(f"{view}: {len(result.errors)} images failed, e.g. {next(iter(result.errors.values()))}")
    print(f"{view}: {len(paths)} images in {took:.0f} s ({runner.precision})", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(file, paths=np.array(paths), x=result.features)
    return result.features


def arguments(description: str, heads: int, sets: list[str] | None = None) -> argparse.ArgumentParser:
    """The options every ``cv_table`` script takes (``heads``, ``sets``: their defaults; no
    ``sets``: ``--sets`` must be given)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--cache", type=Path, required=True, help="where each view's features are kept between runs")
    ap.add_argument("--tasks", nargs="+", default=["isic8", "isic8-binary", "flowers12"])
    ap.add_argument("--sets", nargs="+", required=sets is None, default=sets)
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="fold seeds (each a different 5-fold split)")
    return ap


def cv_table(args: argparse.Namespace, methods: dict) -> None:
    """One Markdown row per task, feature set, fold seed and method: out-of-fold scores of 5-fold
    stratified CV over all labelled images; ``methods``: name -> ``member(x, y, train, held_out,
    n_classes, seed, heads)`` giving one view's held-out probabilities (a set's views averaged)."""
    from sklearn.model_selection import StratifiedKFold

    paths, tasks = labelled_images(args.data)
    feats = {v: extract(v, paths, args.cache) for v in dict.fromkeys(v for s in args.sets for v in s.split("+"))}
    print("| task | features | method | seed | accuracy | balanced acc | ROC-AUC | log loss | ECE |\n|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks:
        rows, y, n_classes = tasks[task]
        for name in args.sets:
            for seed in args.seeds:
                for method, member in methods.items():
                    oof = np.zeros((len(y), n_classes))
                    for fold, (train, held_out) in enumerate(StratifiedKFold(5, shuffle=True, random_state=seed).split(rows, y)):
                        oof[held_out] = np.mean([member(feats[v][rows].astype(np.float32), y, train, held_out, n_classes, fold + 10 * seed, args.heads)
                                                 for v in name.split("+")], 0)
                    print(f"| {task} | {name} | {method} | {seed} | {metric_cells(scores(y, oof, n_classes))} |", flush=True)


def main() -> None:
    cv_table(arguments(__doc__.split("\n\n")[0], heads=3).parse_args(), {"carve": calibrated_member})


if __name__ == "__main__":
    main()
