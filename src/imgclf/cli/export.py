"""``imgclf export``: one parity-checked ONNX graph of a model, optionally int8."""

from __future__ import annotations

import argparse
import logging
import sys

from imgclf.cli.common import positive_int

log = logging.getLogger("imgclf")

EPILOG_EXPORT = """\
The graph takes uint8 RGB (batch, 3, S, S) — the picture resized/cropped as the metadata's
resize policy says — and returns class probabilities; normalisation is inside the graph.
Beside MODEL.onnx: MODEL.onnx.json (metadata + the ONNX file's sha256; a modified file is
refused). Parity with PyTorch (max |dP| <= 1e-4, same top-1) is checked on real images
before anything is written. --quantize int8 also writes MODEL.int8.onnx and reports the
test-split accuracy change; predict/serve only use it when pointed at it.
"""


def register(subparsers, commands) -> None:
    from imgclf.export.quantize import CALIBRATION_IMAGES, QUANTIZE_CHOICES

    p = subparsers.add_parser(
        "export", help="export a model to one ONNX graph (parity-checked)",
        description="Export MODEL (run folder or model.json) to one ONNX graph: uint8 RGB in, class probabilities out, with its metadata.",
        epilog=EPILOG_EXPORT, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="run folder or model.json")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default: onnx)")
    p.add_argument("--out", default=None, help="output .onnx file or folder (default: MODEL/model.onnx)")
    p.add_argument("--quantize", default=None, choices=list(QUANTIZE_CHOICES), help="also write a static int8 model calibrated on training images, with the test accuracy change")
    p.add_argument("--images", default=None, help="folder of images for the parity check (default: the run's split.csv images)")
    p.add_argument("--calibration", default=None, help="folder of images to calibrate int8 on (default: the run's training images)")
    p.add_argument("--calibration-size", type=positive_int, default=CALIBRATION_IMAGES, help=f"images used for int8 calibration (default: {CALIBRATION_IMAGES})")
    p.add_argument("--test-data", default=None, help="labelled folder (DATA/test/<class> or DATA/<class>) for the int8 accuracy change (default: the run's test split)")
    p.add_argument("--weights", default=None, help="where to read the backbone weights if not where training found them")
    p.add_argument("--cache-dir", default=None, help="imgclf cache folder (default: $IMGCLF_CACHE_DIR or ~/.cache/imgclf)")
    commands["export"] = cmd_export


def cmd_export(args) -> int:
    from imgclf.export.onnx import ParityError, export_onnx

    try:
        res = export_onnx(
            args.model, args.out, quantize=args.quantize, images=args.images, calibration_images=args.calibration,
            test_data=args.test_data, n_calibration=args.calibration_size, weights=args.weights, cache_dir=args.cache_dir,
        )
    except ParityError as e:
        print(f"imgclf: error: {e}", file=sys.stderr)
        return 1
    for line in res.summary_lines():
        print(line, flush=True)
    return 0
