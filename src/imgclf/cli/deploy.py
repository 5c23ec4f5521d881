"""Sub-commands added by this module (see ``imgclf.cli.main.EXTENSION_MODULES``): ``export`` and ``serve``."""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("imgclf")

EPILOG_EXPORT = """\
The graph takes uint8 RGB (batch, 3, S, S) — the picture resized/cropped as the metadata's
resize policy says — and returns class probabilities; normalisation is inside the graph.
Beside MODEL.onnx: MODEL.onnx.json (metadata + the ONNX file's sha256; a modified file is
refused). Parity with PyTorch (max |dP| <= 1e-4, same top-1) is checked on real images
before anything is written. --quantize int8 also writes MODEL.int8.onnx and reports the
test-split accuracy change; predict/serve only use it when pointed at it.
"""

EPILOG_SERVE = """\
endpoints: POST /v1/predict (multipart field 'file', repeat for several images),
GET /v1/model, GET /healthz, POST /v1/explain (Grad-CAM PNG, when available),
API docs at /docs, a web page at /.
example: curl -F file=@photo.jpg http://127.0.0.1:8000/v1/predict
The API key may also come from $IMGCLF_API_KEY (keeps it out of the process list).
"""


def _bounded(cast, what: str, ok, rule: str):
    """argparse type: ``cast`` the text, then require ``ok(value)``; one-line errors."""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return v

    return parse


_positive_float = _bounded(float, "a number", lambda v: v > 0, "> 0")
_non_negative_float = _bounded(float, "a number", lambda v: v >= 0, ">= 0")
_positive_int = _bounded(int, "an integer", lambda v: v >= 1, ">= 1")
_port = _bounded(int, "a port number", lambda v: 0 <= v <= 65535, "0..65535 (0 = any free port)")


def register(subparsers, commands) -> None:
    """Add ``export`` and ``serve``."""
    from imgclf.serve.app import DEFAULT_BATCH_WAIT_MS, DEFAULT_MAX_BATCH, DEFAULT_MAX_FILES, DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_MB
    from imgclf.export.onnx import CALIBRATION_IMAGES, QUANTIZE_CHOICES

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
    p.add_argument("--calibration-size", type=_positive_int, default=CALIBRATION_IMAGES, help=f"images used for int8 calibration (default: {CALIBRATION_IMAGES})")
    p.add_argument("--test-data", default=None, help="labelled folder (DATA/test/<class> or DATA/<class>) for the int8 accuracy change (default: the run's test split)")
    p.add_argument("--weights", default=None, help="where to read the backbone weights if not where training found them")
    p.add_argument("--cache-dir", default=None, help="imgclf cache folder (default: $IMGCLF_CACHE_DIR or ~/.cache/imgclf)")
    commands["export"] = cmd_export

    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP (REST API + web page)",
        description="Serve MODEL (run folder, model.json or an exported .onnx) with FastAPI + uvicorn. ONNX Runtime on the model's export (made now if missing) unless --engine torch.",
        epilog=EPILOG_SERVE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="run folder, model.json or an exported .onnx file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (default: 8000; 0 = any free port, printed at start)")
    p.add_argument("--api-key", default=None, help="require this key in the X-API-Key header of /v1/* requests (default: $IMGCLF_API_KEY if set)")
    p.add_argument("--max-upload-mb", type=_positive_float, default=DEFAULT_MAX_UPLOAD_MB, help=f"largest accepted image file, MB (default: {DEFAULT_MAX_UPLOAD_MB:g})")
    p.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS, help=f"largest accepted image, width x height (default: {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--max-files", type=_positive_int, default=DEFAULT_MAX_FILES, help=f"images per request (default: {DEFAULT_MAX_FILES})")
    p.add_argument("--batch-wait-ms", type=_non_negative_float, default=DEFAULT_BATCH_WAIT_MS, help=f"how long to wait for concurrent requests to batch together, ms (default: {DEFAULT_BATCH_WAIT_MS:g})")
    p.add_argument("--max-batch", type=_positive_int, default=DEFAULT_MAX_BATCH, help=f"most images per inference batch (default: {DEFAULT_MAX_BATCH})")
    p.add_argument("--no-explain", action="store_true", help="leave out POST /v1/explain (Grad-CAM) even where imgclf.explain.gradcam is available")
    p.add_argument("--engine", default="auto", choices=["auto", "onnx", "torch"], help="auto: ONNX Runtime (exporting now if needed), PyTorch if that fails; onnx: ONNX Runtime or an error; torch: eager PyTorch (default: auto)")
    p.add_argument("--weights", default=None, help="where to read the backbone weights if not where training found them")
    p.add_argument("--cache-dir", default=None, help="imgclf cache folder (default: $IMGCLF_CACHE_DIR or ~/.cache/imgclf)")
    commands["serve"] = cmd_serve


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


def cmd_serve(args) -> int:
    from imgclf.serve.app import ServeConfig, serve

    key = args.api_key if args.api_key is not None else os.environ.get("IMGCLF_API_KEY") or None
    config = ServeConfig(
        api_key=key, max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, max_files=args.max_files,
        batch_wait_ms=args.batch_wait_ms, max_batch=args.max_batch,
    ).validate()
    level = "debug" if args.verbose else "warning" if args.quiet else "info"
    serve(
        args.model, host=args.host, port=args.port, config=config, engine=args.engine, weights=args.weights,
        cache_dir=args.cache_dir, log_level=level, announce=lambda s: print(s, flush=True), explain=not args.no_explain,
    )
    return 0
