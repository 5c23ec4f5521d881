"""Assembling the server: :func:`create_app` puts the model, limits, batcher and Grad-CAM
engine on ``app.state`` and adds the middleware, error handlers and routes;
:func:`load_serving_model` picks what to serve from a model path."""

import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI

from imgclf._version import __version__
from imgclf.serve.batching import MicroBatcher
from imgclf.serve.config import ServeConfig
from imgclf.serve.errors import install_error_handlers
from imgclf.serve.explainer import Explainer, explain_module
from imgclf.serve.limits import RequestLimit
from imgclf.serve.routes import add_routes, load_web_assets
from imgclf.serve.security import API_KEY_HEADER, SecurityHeaders
from imgclf.serve.similar import open_similar_cases
from imgclf.serve.uploads import SUPPORTED_TYPES

log = logging.getLogger("imgclf")


@asynccontextmanager
async def _lifespan(app):
    yield
    if app.state.neighbor_batcher is not None:
        app.state.neighbor_batcher.close()
    app.state.batcher.close()
    if app.state.explainer is not None:
        app.state.explainer.close()


def create_app(model, config: ServeConfig | None = None, *, bundle_dir: str | os.PathLike | None = None, explain=None, weights=None, cache_dir=None):
    """The FastAPI app around ``model`` (an :class:`~imgclf.predict.onnx_predictor.OnnxClassifier`,
    :class:`~imgclf.predict.torch_predictor.TorchClassifier` or
    :class:`~imgclf.predict.feature_arrays.FeatureArrayClassifier`). ``explain``: the Grad-CAM module to use
    (default: :func:`~imgclf.serve.explainer.explain_module`, only when ``bundle_dir`` is
    given); ``False`` = off. Similar training cases are served when the bundle (``bundle_dir``,
    or the TorchClassifier's own) has a usable index and ``config.max_neighbors`` > 0; the index
    and the feature path are loaded here, before the first request."""
    config = (config or ServeConfig()).validate()
    info = model.info()
    similar, no_similar = open_similar_cases(model, bundle_dir, enabled=config.max_neighbors > 0, weights=weights, cache_dir=cache_dir)
    if explain is None:
        explain = explain_module() if bundle_dir is not None else None
    elif explain is False:
        explain = None
    if explain is not None and bundle_dir is None:
        explain = None

    app = FastAPI(
        title="imgclf",
        version=__version__,
        summary=f"Image classifier {info['model_id']}: {', '.join(info['class_names'])}",
        description=(
            f"Classes: {', '.join(info['class_names'])}. Engine: {info['engine']}. Images are sent as multipart field `file` "
            f"({SUPPORTED_TYPES}; at most {config.max_upload_mb:g} MB and {config.max_pixels:,} pixels each, {config.max_files} per request)."
            + (f" Requests need the `{API_KEY_HEADER}` header." if config.api_key else "")
        ),
        lifespan=_lifespan,
        docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None,  # /docs: our offline page (serve.docs)
    )
    app.add_middleware(RequestLimit, limit=config.request_limit)
    app.add_middleware(SecurityHeaders)  # added last = outermost: its headers go on the 503s too
    state = app.state
    state.model = model
    state.model_info = info
    state.class_names = list(model.class_names_)
    state.config = config
    state.batcher = MicroBatcher(model.predict_proba_arrays, max_batch=config.max_batch, wait_ms=config.batch_wait_ms)
    state.similar, state.no_similar = similar, no_similar
    state.neighbor_batcher = None if similar is None else MicroBatcher(
        lambda batch: similar.search(batch, config.max_neighbors), max_batch=config.max_batch, wait_ms=config.batch_wait_ms, thread_of=state.batcher,
    )
    state.decode_limiter = anyio.CapacityLimiter(config.decode_threads)
    state.explainer = Explainer(explain, bundle_dir, weights=weights, cache_dir=cache_dir) if explain is not None else None
    state.web_assets = load_web_assets()
    state.started = time.time()

    install_error_handlers(app)
    add_routes(app, explain=explain is not None, neighbors=similar is not None)
    return app


def load_serving_model(model: str | os.PathLike, engine: str = "auto", *, weights=None, cache_dir=None):
    """(predictor with ``predict_proba_arrays``/``info``, bundle folder or None).

    auto: a verified, up-to-date ONNX export (made now if missing; a failed export falls
    back to the PyTorch graph with a warning), or the feature path where it measured faster
    than that export within parity (:func:`~imgclf.predict.choose.serving_choice`, the choice
    ``predict --engine auto`` makes and keeps); onnx: the export or an error; torch: the
    eager PyTorch graph. An ``.onnx`` path is served as is (after its integrity checks).
    """
    from imgclf.export.metadata import ExportError, bundle_hashes
    from imgclf.predict.choose import predictor_for, serving_choice
    from imgclf.predict.onnx_predictor import OnnxClassifier
    from imgclf.predict.torch_predictor import TorchClassifier

    if engine not in ("auto", "onnx", "torch"):
        raise ValueError("--engine must be one of auto, onnx, torch")
    p = Path(model)
    if p.suffix.lower() == ".onnx":
        if engine == "torch":
            raise ValueError(f"{model} is an ONNX export; --engine torch needs the model folder")
        clf = OnnxClassifier(p)
        bundle = None
        if (p.parent / "model.json").is_file() and (p.parent / "model.safetensors").is_file():
            try:
                if bundle_hashes(p.parent)["bundle_id"] == clf.sidecar.get("source", {}).get("bundle_id"):
                    bundle = p.parent
            except Exception:  # noqa: BLE001 - explain simply stays off
                bundle = None
        return clf, bundle
    if engine == "torch":
        clf = TorchClassifier(model, weights=weights, cache_dir=cache_dir)
        return clf, clf.path
    from imgclf.model.bundle import resolve_bundle_dir

    d = resolve_bundle_dir(model)
    try:
        export = predictor_for(d, "onnx", weights=weights, cache_dir=cache_dir)
    except ExportError as e:
        if engine == "onnx":
            raise
        log.warning("ONNX Runtime unavailable for this model (%s); serving the PyTorch graph", e)
        return TorchClassifier(d, weights=weights, cache_dir=cache_dir), d
    return (export if engine == "onnx" else serving_choice(d, export, weights=weights, cache_dir=cache_dir)), d
