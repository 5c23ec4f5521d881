"""``imgclf serve``: the REST API and web page over a model."""

from __future__ import annotations

import argparse
import logging
import os

from imgclf.cli.common import non_negative_float, port, positive_float, positive_int

log = logging.getLogger("imgclf")

EPILOG_SERVE = """\
endpoints: POST /v1/predict (multipart field 'file', repeat for several images),
GET /v1/model, GET /healthz, POST /v1/explain (Grad-CAM PNG, when available),
API docs at /docs, a web page at /.
example: curl -F file=@photo.jpg http://127.0.0.1:8000/v1/predict
The API key may also come from $IMGCLF_API_KEY (keeps it out of the process list).
"""



def register(subparsers, commands) -> None:
    from imgclf.serve.config import DEFAULT_BATCH_WAIT_MS, DEFAULT_MAX_BATCH, DEFAULT_MAX_FILES, DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_MB
    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP (REST API + web page)",
        description="Serve MODEL (run folder, model.json or an exported .onnx) with FastAPI + uvicorn. ONNX Runtime on the model's export (made now if missing) unless --engine torch.",
        epilog=EPILOG_SERVE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="run folder, model.json or an exported .onnx file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port, default=8000, help="port (default: 8000; 0 = any free port, printed at start)")
    p.add_argument("--api-key", default=None, help="require this key in the X-API-Key header of /v1/* requests (default: $IMGCLF_API_KEY if set)")
    p.add_argument("--max-upload-mb", type=positive_float, default=DEFAULT_MAX_UPLOAD_MB, help=f"largest accepted image file, MB (default: {DEFAULT_MAX_UPLOAD_MB:g})")
    p.add_argument("--max-pixels", type=positive_int, default=DEFAULT_MAX_PIXELS, help=f"largest accepted image, width x height (default: {DEFAULT_MAX_PIXELS:,})")
    p.add_argument("--max-files", type=positive_int, default=DEFAULT_MAX_FILES, help=f"images per request (default: {DEFAULT_MAX_FILES})")
    p.add_argument("--batch-wait-ms", type=non_negative_float, default=DEFAULT_BATCH_WAIT_MS, help=f"how long to wait for concurrent requests to batch together, ms (default: {DEFAULT_BATCH_WAIT_MS:g})")
    p.add_argument("--max-batch", type=positive_int, default=DEFAULT_MAX_BATCH, help=f"most images per inference batch (default: {DEFAULT_MAX_BATCH})")
    p.add_argument("--no-explain", action="store_true", help="leave out POST /v1/explain (Grad-CAM) even where imgclf.explain.gradcam is available")
    p.add_argument("--engine", default="auto", choices=["auto", "onnx", "torch"], help="auto: ONNX Runtime (exporting now if needed), PyTorch if that fails; onnx: ONNX Runtime or an error; torch: eager PyTorch (default: auto)")
    p.add_argument("--weights", default=None, help="where to read the backbone weights if not where training found them")
    p.add_argument("--cache-dir", default=None, help="imgclf cache folder (default: $IMGCLF_CACHE_DIR or ~/.cache/imgclf)")
    commands["serve"] = cmd_serve


def cmd_serve(args) -> int:
    from imgclf.serve.config import ServeConfig
    from imgclf.serve.server import serve

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
