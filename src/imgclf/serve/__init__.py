"""REST server and web page: ``imgclf serve MODEL`` (FastAPI + uvicorn).

Endpoints (JSON errors everywhere: ``{"error": {"code": ..., "message": ...}}``):

* ``POST /v1/predict``  one or more images as multipart field ``file`` (repeat the field for
  several) → class probabilities, predicted class, the decision threshold used, model id;
* ``POST /v1/explain``  one image → Grad-CAM overlay PNG; only when :mod:`imgclf.explain.gradcam`
  can be imported and the model folder (model.json + model.safetensors) is at hand;
* ``POST /v1/predict?neighbors=K``  also each image's K most similar training images (label,
  similarity, thumbnail URL; the path only with ``neighbor_paths``), when the model has a
  similar-cases index; K up to ``max_neighbors``;
* ``GET /v1/neighbors/{index}/thumbnail``  a similar case's JPEG thumbnail from the bundle
  (only when the model has an index);
* ``GET /v1/model``     model metadata, the server's limits, whether similar cases are available;
* ``GET /healthz``      liveness; ``GET /docs`` Swagger UI (its files served from here, no CDN); ``GET /`` the web page.

Every GET endpoint answers HEAD too (same status and headers, no body), for load balancers.

Safety: binds 127.0.0.1 unless told otherwise; the request body is streamed through an
in-memory multipart parser with per-file, per-request and file-count limits (nothing is
spooled to disk, unlike Starlette's form parser); the image type is sniffed from the
bytes (JPEG, PNG, GIF, BMP, TIFF, WebP) and Pillow may only use that decoder; the pixel
count is checked from the header before decoding; a bad image is a 4xx JSON answer; an
optional API key (``X-API-Key``) is compared in constant time; models are loaded only
from a verified ONNX export or a safetensors bundle.

Slow and silent clients: request headers must arrive within ``header_timeout_s`` and the
body may not pause longer than ``body_timeout_s``; past ``max_connections`` the connection
waiting longest for a request is closed; past ``max_requests`` in progress new requests get
503 at once, except ``/healthz``, which always answers. A client that hangs up mid-upload is
one log line.

Concurrency: decoding runs in worker threads (bounded), inference in one dedicated
thread; requests that arrive within ``batch_wait_ms`` of each other are run as one batch
(up to ``max_batch`` images), so the event loop never blocks on the model. Similar-case
searches (backbone features + index search) are batched the same way in that same thread.

Modules: ``config`` (ServeConfig: the declared settings and limits), ``uploads`` (multipart
reading, sniffing, decoding), ``batching`` (MicroBatcher), ``security`` (API key, headers,
CSP, HEAD bodies), ``limits`` (requests in progress), ``errors`` (the JSON error shape),
``schemas`` (OpenAPI models), ``docs`` (the offline /docs page), ``explainer`` (Grad-CAM), ``similar`` (similar
training cases: the index and the feature path, opened at startup), ``routes`` (the endpoints), ``app``
(create_app, load_serving_model), ``connections`` (read timeouts and the connection cap in
uvicorn's protocol), ``server`` (serve).
"""
