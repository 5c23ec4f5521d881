"""The endpoints, as plain functions that read what they serve from ``request.app.state``
(model, model_info, class_names, config, batcher, decode_limiter, explainer, similar,
no_similar, neighbor_batcher, web_assets, started; set up by :func:`imgclf.serve.app.create_app`), and :func:`add_routes`, which
declares their paths, auth and OpenAPI documentation on an app."""

import asyncio
import time
from importlib.resources import files as package_files

import anyio
import numpy as np
from fastapi import Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, Response

from imgclf._version import __version__
from imgclf.serve.docs import DOCS_ASSETS_URL, DOCS_URL, docs, docs_asset
from imgclf.serve.errors import ApiError
from imgclf.serve.schemas import ERROR_RESPONSES, ErrorResponse, PredictResponse, multipart_doc
from imgclf.serve.security import PAGE_CSP, check_key
from imgclf.serve.uploads import (
    SUPPORTED_TYPES,
    DecodedUpload,
    Upload,
    decode_upload,
    read_multipart,
)

WEB_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def load_web_assets() -> dict[str, bytes]:
    """The page's files (``imgclf/serve/web/``), read once when the app is made."""
    return {name: (package_files("imgclf.serve") / "web" / name).read_bytes() for name in WEB_FILES}


async def _decode_all(request: Request, uploads: list[Upload], keep_image: bool = False) -> list[DecodedUpload]:
    """Decode a request's files in parallel (up to the decode limiter's threads), in order."""
    state = request.app.state
    prep = state.model.preprocessing
    return list(await asyncio.gather(*(
        anyio.to_thread.run_sync(decode_upload, up.data, up.filename, prep, state.config.max_pixels, keep_image, limiter=state.decode_limiter)
        for up in uploads
    )))


def _files(parts: list[Upload]) -> list[Upload]:
    files = [p for p in parts if p.field == "file"]
    if not files:
        raise ApiError(400, "no-file", "no image in the request: send it as multipart form field 'file'")
    return files


def _check_neighbors(state, k: int) -> None:
    """Refuse ``?neighbors=K`` before the upload is read: no index here, or K over the limit."""
    if k == 0:
        return
    if state.similar is None:
        raise ApiError(400, "no-similar-cases", state.no_similar)
    if k > state.config.max_neighbors:
        raise ApiError(422, "invalid-request", f"query.neighbors: at most {state.config.max_neighbors} similar cases per image on this server (--max-neighbors)")


def _case(state, case) -> dict:
    return {
        "index": case.index, "label": case.label, "similarity": case.similarity,
        "path": case.path if state.config.neighbor_paths else None,
        "thumbnail_url": f"/v1/neighbors/{case.index}/thumbnail" if state.similar.thumbnail(case.index) else None,
    }


async def predict(request: Request, neighbors: int = 0):
    state = request.app.state
    info, names, decision = state.model_info, state.class_names, state.model.decision
    _check_neighbors(state, neighbors)
    files = _files(await read_multipart(request, state.config))
    decoded = await _decode_all(request, files)
    batch = np.stack([d.array for d in decoded])
    if neighbors:  # both in the one inference thread, one after the other
        probs, cases = await asyncio.gather(state.batcher.submit(batch), state.neighbor_batcher.submit(batch))
    else:
        probs, cases = await state.batcher.submit(batch), [None] * len(decoded)
    idx = decision.indices(probs)
    th = decision.to_dict()
    return {
        "model_id": info["model_id"],
        "engine": info["engine"],
        "class_names": names,
        "threshold": th["value"] if th else None,
        "positive_class": th["positive_class"] if th else None,
        "decision": decision.description,
        "predictions": [
            {
                "filename": d.filename, "format": d.format, "width": d.width, "height": d.height,
                "predicted": names[int(k)], "probability": float(row[int(k)]),
                "probabilities": {c: float(v) for c, v in zip(names, row)},
                "neighbors": None if found is None else [_case(state, case) for case in found[:neighbors]],
            }
            for d, row, k, found in zip(decoded, probs, idx, cases)
        ],
    }


async def model_info(request: Request):
    state = request.app.state
    config, batcher = state.config, state.batcher
    return {
        **state.model_info,
        "imgclf_version": __version__,
        "explain": state.explainer is not None,
        "neighbors": {
            "available": state.similar is not None, "cases": len(state.similar) if state.similar is not None else None,
            "max_neighbors": config.max_neighbors, "paths": config.neighbor_paths, "reason": state.no_similar,
        },
        "limits": {
            "max_upload_mb": config.max_upload_mb, "max_pixels": config.max_pixels, "max_files": config.max_files,
            "max_batch": config.max_batch, "batch_wait_ms": config.batch_wait_ms, "types": SUPPORTED_TYPES,
        },
        "api_key_required": bool(config.api_key),
        "stats": {
            "requests": batcher.requests,
            "batches": batcher.batches,
            "images": batcher.images,
            "mean_batch": round(batcher.images / batcher.batches, 2) if batcher.batches else None,
        },
    }


async def neighbor_thumbnail(request: Request, index: int):
    """The stored JPEG of similar case ``index``; the same bytes for as long as the model is the
    same, so clients may keep it (the ETag names model and case)."""
    state = request.app.state
    if not 0 <= index < len(state.similar):
        raise ApiError(404, "not-found", f"no similar case {index}: this model's index holds cases 0 to {len(state.similar) - 1}")
    jpeg = state.similar.thumbnail(index)
    if not jpeg:
        raise ApiError(404, "no-thumbnail", f"similar case {index} has no thumbnail (its image could not be read when the model was trained)")
    etag = f'"{state.model_info["model_id"]}-{index}"'
    headers = {"Cache-Control": "private, max-age=3600", "ETag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(jpeg, media_type="image/jpeg", headers=headers)


async def healthz(request: Request):
    return {"status": "ok", "uptime_s": round(time.time() - request.app.state.started, 1)}


async def index(request: Request):
    return HTMLResponse(request.app.state.web_assets["index.html"], headers={"Content-Security-Policy": PAGE_CSP})


async def static(request: Request, name: str):
    if name not in WEB_FILES or name == "index.html":
        raise ApiError(404, "not-found", "no such file")
    return Response(request.app.state.web_assets[name], media_type=WEB_FILES[name], headers={"Cache-Control": "no-cache"})


async def favicon():
    return Response(status_code=204)


def _class_name_query(class_names: list[str]):
    """The ``class_name`` query parameter of /v1/explain, its schema listing this model's classes
    (so the document says which values are accepted; anything else is a 400 ``unknown-class``)."""
    return Query(None, description="class to explain (default: the predicted one)", json_schema_extra={"enum": list(class_names)})


async def explain_endpoint(request: Request, class_name: str | None):
    names = request.app.state.class_names
    if class_name is not None and class_name not in names:
        raise ApiError(400, "unknown-class", f"class_name {class_name!r} is not a class of this model ({', '.join(names)})")
    files = _files(await read_multipart(request, request.app.state.config))
    if len(files) != 1:
        raise ApiError(400, "one-file", "send exactly one image to /v1/explain")
    (dec,) = await _decode_all(request, files, keep_image=True)
    try:
        png, cls, prob = await request.app.state.explainer.explain(dec.image, class_name)
    except ValueError as e:
        raise ApiError(400, "cannot-explain", str(e).splitlines()[0] if str(e) else "cannot explain this image") from None
    return Response(png, media_type="image/png", headers={"X-Class": cls, "X-Probability": f"{prob:.6f}", "Access-Control-Expose-Headers": "X-Class, X-Probability"})


def _get_and_head(app, path: str, endpoint, *, dependencies=None, **doc) -> None:
    """GET ``path``, and HEAD answered by the same function (load balancers probe with HEAD;
    FastAPI routes only the methods named). The body is dropped by
    :class:`~imgclf.serve.security.SecurityHeaders`; HEAD stays out of the OpenAPI document."""
    app.get(path, dependencies=dependencies, **doc)(endpoint)
    app.head(path, dependencies=dependencies, include_in_schema=False)(endpoint)


def _neighbors_query(limit: int, reason: str | None):
    """The ``neighbors`` query parameter of /v1/predict; its documented maximum is this server's
    (0 when it has no similar cases, and then any K > 0 is a 400 ``no-similar-cases``)."""
    text = f"how many similar training images to return per image, 0 to {limit}" if reason is None else f"0 only: {reason}"
    return Query(0, ge=0, description=text, json_schema_extra={"maximum": limit if reason is None else 0})


def add_routes(app, *, explain: bool, neighbors: bool = False) -> None:
    """Register the endpoints on ``app``; ``/v1/explain`` only when ``explain``, the thumbnails
    of similar cases only when ``neighbors``. The OpenAPI document describes this server as
    configured: the API key scheme and its 401 only when it has a key, the explain
    ``class_name`` values of its model, the ``neighbors`` bound and the thumbnail indices."""
    state = app.state
    keyed = bool(state.config.api_key)
    key = [Depends(check_key)] if keyed else []
    errors = ERROR_RESPONSES if keyed else {s: r for s, r in ERROR_RESPONSES.items() if s != 401}

    async def predict_with_neighbors(request: Request, neighbors: int = _neighbors_query(state.config.max_neighbors, state.no_similar)):
        return await predict(request, neighbors)

    app.post("/v1/predict", response_model=PredictResponse, responses=errors, dependencies=key, openapi_extra=multipart_doc(True, max_files=state.config.max_files),
             summary="Classify one or more images", description="With `?neighbors=K`, also the K most similar training images of each (when the model has a similar-cases index).")(predict_with_neighbors)
    if neighbors:
        count = len(state.similar)

        async def thumbnail(request: Request, index: int = Path(description=f"a similar case's index, 0 to {count - 1}", json_schema_extra={"minimum": 0, "maximum": count - 1})):
            return await neighbor_thumbnail(request, index)

        not_found = {404: {"model": ErrorResponse, "description": "no such case, or no thumbnail stored for it"}, 422: ERROR_RESPONSES[422]}
        _get_and_head(app, "/v1/neighbors/{index}/thumbnail", thumbnail, dependencies=key, response_class=Response, summary="JPEG thumbnail of a similar training case",
                      responses={200: {"content": {"image/jpeg": {}}, "description": "the stored thumbnail"}, 304: {"description": "not modified (If-None-Match)"},
                                 **not_found, **({401: ERROR_RESPONSES[401]} if keyed else {})})
    _get_and_head(app, "/v1/model", model_info, dependencies=key, responses={401: ERROR_RESPONSES[401]} if keyed else {}, summary="Model metadata and server limits")
    _get_and_head(app, "/healthz", healthz, summary="Liveness")
    _get_and_head(app, "/", index, include_in_schema=False)
    _get_and_head(app, "/static/{name}", static, include_in_schema=False)
    _get_and_head(app, "/favicon.ico", favicon, include_in_schema=False)
    _get_and_head(app, DOCS_URL, docs, include_in_schema=False)
    _get_and_head(app, DOCS_ASSETS_URL + "/{name}", docs_asset, include_in_schema=False)
    if explain:
        async def explain_class(request: Request, class_name: str | None = _class_name_query(state.class_names)):
            return await explain_endpoint(request, class_name)

        app.post(
            "/v1/explain", dependencies=key, responses={200: {"content": {"image/png": {}}, "description": "Grad-CAM overlay on the model's input crop"}, **errors},
            openapi_extra=multipart_doc(False), response_class=Response, summary="Grad-CAM overlay PNG for one image",
        )(explain_class)
