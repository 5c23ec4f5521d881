"""``imgclf explain``: Grad-CAM overlays, where the model looked."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("imgclf")


def register(subparsers, commands) -> None:
    p = subparsers.add_parser(
        "explain",
        help="Grad-CAM heatmap overlays: where the model looked",
        description=(
            "For each image, a PNG of the model's input crop with a Grad-CAM heatmap (last convolutional stage) for the "
            "predicted class, or for --class NAME. Folders are searched recursively. Runs the PyTorch backbone (gradients "
            "are needed), whatever engine extracted the training features."
        ),
    )
    p.add_argument("model", help="run folder or model.json")
    p.add_argument("images", nargs="+", help="image files and/or folders")
    p.add_argument("--out", required=True, help="folder for the overlay PNGs (<image>_gradcam_<class>.png)")
    p.add_argument("--class", dest="class_name", default=None, help="explain this class instead of the predicted one")
    p.add_argument("--weights", default=None, help="where to read the backbone weights if not where training found them")
    commands["explain"] = cmd_explain


def cmd_explain(args: argparse.Namespace) -> int:
    from imgclf.model.classifier import Classifier
    from imgclf.data.datasets import collect_image_paths
    from imgclf.explain.gradcam import explain_files

    paths, problems = collect_image_paths(args.images)
    if not paths:
        raise ValueError("no image files to explain: " + ("; ".join(problems) or " ".join(args.images)))
    for p in problems:
        log.warning("%s", p)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    clf = Classifier.load(args.model, weights=args.weights)
    written = explain_files(clf, paths, out, class_name=args.class_name)
    for w in written:
        print(w)
    print(f"{len(written)} overlay(s) written to {out}", file=sys.stderr)
    return 0
