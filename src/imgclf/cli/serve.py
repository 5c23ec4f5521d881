"""``imgclf serve``: the REST API and web page over a model."""

from __future__ import annotations

import argparse
import logging
import os

from imgclf.cli.common import port
from imgclf.config.cli_args import add_setting_flags, given
from imgclf.config.settings import build

log = logging.getLogger("imgclf")

API_KEY_ENV = "IMGCLF_API_KEY"

EPILOG_SERVE = f"""\
endpoints: POST /v1/predict (multipart field 'file', repeat for several images),
GET /v1/model, GET /healthz, POST /v1/explain (Grad-CAM PNG, when available),
POST /v1/predict?neighbors=K (also the K most similar training images, when the model
has a similar-cases index) and GET /v1/neighbors/{{index}}/thumbnail (their JPEGs),
API docs at /docs, a web page at /. GET endpoints answer HEAD too.
example: curl -F file=@photo.jpg http://127.0.0.1:8000/v1/predict
The API key may also come from ${API_KEY_ENV} (keeps it out of the process list).
"""


def register(subparsers, commands) -> None:
    from imgclf.serve.config import SERVE_FIELDS  # declarations only: no FastAPI, no uvicorn

    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP (REST API + web page)",
        description="Serve MODEL (run folder, model.json or an exported .onnx) with FastAPI + uvicorn. ONNX Runtime on the model's export (made now if missing), or the faster feature path where it measured within parity, unless --engine says which.",
        epilog=EPILOG_SERVE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="run folder, model.json or an exported .onnx file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port, default=8000, help="port (default: 8000; 0 = any free port, printed at start)")
    p.add_argument("--no-explain", action="store_true", help="leave out POST /v1/explain (Grad-CAM) even where imgclf.explain.gradcam is available")
    p.add_argument("--engine", default="auto", choices=["auto", "onnx", "torch"], help="auto: ONNX Runtime on the model's export (made now if needed), or the feature path (OpenVINO/ONNX Runtime backbone features, then the head) where it measured faster than the export within parity, as predict --engine auto chooses; PyTorch if no export can be made; onnx: ONNX Runtime or an error; torch: eager PyTorch (default: auto)")
    p.add_argument("--weights", default=None, help="where to read the backbone weights if not where training found them")
    p.add_argument("--cache-dir", default=None, help="imgclf cache folder (default: $IMGCLF_CACHE_DIR or ~/.cache/imgclf)")
    add_setting_flags(p, SERVE_FIELDS)
    commands["serve"] = cmd_serve


def serve_config_from_args(args):
    """The ServeConfig the command line asks for: the flags given, the API key from
    ``$IMGCLF_API_KEY`` when --api-key is not, the declared defaults for the rest."""
    from imgclf.serve.config import SERVE_FIELDS, ServeConfig

    values = given(args, SERVE_FIELDS)
    if "api_key" not in values:
        env_key = os.environ.get(API_KEY_ENV)
        if env_key is not None and env_key != "" and not env_key.strip():
            raise ValueError(f"${API_KEY_ENV} is blank: unset it or give it a key")
        if env_key:
            values["api_key"] = env_key
    return build(ServeConfig, SERVE_FIELDS, "server setting(s)", **values)


def cmd_serve(args) -> int:
    from imgclf.serve.server import serve

    config = serve_config_from_args(args)
    level = "debug" if args.verbose else "warning" if args.quiet else "info"
    serve(
        args.model, host=args.host, port=args.port, config=config, engine=args.engine, weights=args.weights,
        cache_dir=args.cache_dir, log_level=level, announce=lambda s: print(s, flush=True), explain=not args.no_explain,
    )
    return 0
