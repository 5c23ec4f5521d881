"""The OpenAPI document and what is built on it.

Fuzzing (schemathesis) against the server's own document: every documented operation, with and
without an API key, gets valid and invalid requests; none may be answered 5xx, and every answer
must match what the document says (status code, content type, body schema, headers). In process
(schemathesis' ASGI transport, no socket), on the stub model of the robustness tests and a
stand-in Grad-CAM module, so it costs seconds. Bounded and repeatable: a fixed number of
examples per operation, a fixed seed, derandomized, no example database, no deadline.

The /docs page: Swagger UI from the server itself (the browser check is in test_browser_serve.py)."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image

schemathesis = pytest.importorskip("schemathesis")

from imgclf.serve.app import create_app  # noqa: E402
from imgclf.serve.config import ServeConfig  # noqa: E402
from test_serve_robustness import StubModel  # noqa: E402

EXAMPLES_PER_OPERATION = 25
API_KEY = "fuzz-key-1234"
REJECTION_STATUSES = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]  # schemathesis' list + 413
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
FUZZ_SETTINGS = settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
answered: Counter = Counter()  # (which app, method, path, status) → count, for the last test


def fuzz_config(api_key: str | None):
    return schemathesis.config.SchemathesisConfig.from_dict({
        "seed": 20261201,
        # Literals harvested from the source would be sent as "valid" image bytes (any bytes are
        # a valid `format: binary`); the upload strategy below draws real images instead.
        "analysis": {"constants": {"enabled": False}},
        # A request over a documented limit (too many files) is refused with 413, as documented.
        "checks": {"negative_data_rejection": {"expected-statuses": REJECTION_STATUSES}},
        **({"auth": {"openapi": {"APIKeyHeader": {"api_key": api_key}}}} if api_key else {}),
    })


def encode_image(fmt: str, mode: str, width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    if fmt in ("JPEG", "BMP") and mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


# The document says `format: binary` (any bytes) but means an image: schema-valid uploads are
# drawn as small real images of every accepted type and a few pixel modes, so "valid requests
# are accepted" is a real check of decoding; invalid ones (wrong types, missing parts) stay
# schemathesis' own. (Registered for this process; no other test uses schemathesis.)
schemathesis.openapi.format("binary", st.builds(
    encode_image, st.sampled_from(IMAGE_FORMATS), st.sampled_from(("RGB", "L", "RGBA", "P")),
    st.integers(1, 48), st.integers(1, 48), st.integers(0, 2**16),
))


class StubGradCam:
    """Stands in for :mod:`imgclf.explain.gradcam`: a flat heat map, the asked-for class or the first."""

    @staticmethod
    def gradcam(clf, image, class_name=None):
        k = 0 if class_name is None else clf.class_names_.index(class_name)
        return np.full((32, 32), 0.5, dtype=np.float32), k, 0.5

    @staticmethod
    def overlay(image, heatmap):
        return image.convert("RGB")


def fuzz_schema(api_key: str | None):
    """The app's schema, loaded through the app itself (built at import: schemathesis'
    fixture-based loader does not work with this pytest)."""
    model = StubModel()
    config = ServeConfig(api_key=api_key, max_upload_mb=0.25, max_files=3, max_pixels=1_000_000)
    app = create_app(model, config, bundle_dir=Path("unused-bundle"), explain=StubGradCam)
    app.state.explainer._classifier = model  # the stub gradcam needs only class_names_: no bundle is loaded
    assert "/v1/explain" in app.openapi()["paths"]
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=fuzz_config(api_key))


open_schema = fuzz_schema(None)
keyed_schema = fuzz_schema(API_KEY)


def call_and_check(case, which: str):
    response = case.call_and_validate()  # every default check: no 5xx, documented status, content type, body and headers
    answered[which, case.operation.method.upper(), case.operation.path, response.status_code] += 1
    assert response.status_code < 500, (response.status_code, response.text[:300])


@open_schema.parametrize()
@FUZZ_SETTINGS
def test_generated_requests_get_documented_answers(case):
    call_and_check(case, "open")


@keyed_schema.parametrize()
@FUZZ_SETTINGS
def test_generated_requests_with_an_api_key_get_documented_answers(case):
    call_and_check(case, "api-key")


def test_fuzzing_reached_the_model_on_every_operation():
    """Generated requests got past validation, the key and the decoder: each operation of each
    app answered 200 at least once (else the checks above only saw refusals)."""
    if not answered:
        pytest.skip("runs after the fuzz tests of this module")
    operations = {(w, m, p) for w, m, p, _ in answered}
    assert len(operations) == 8, sorted(operations)
    no_success = sorted(op for op in operations if not answered[(*op, 200)])
    assert not no_success, (no_success, sorted(answered.items()))


def test_app_serves_again_after_a_second_start():
    """Shutdown stops the inference and explain threads; a second lifespan on the same app (a
    second test client, a server restarted in process) must get working ones, not a 500."""
    from fastapi.testclient import TestClient

    from test_serve_robustness import png

    model = StubModel()
    app = create_app(model, ServeConfig(), bundle_dir=Path("unused-bundle"), explain=StubGradCam)
    app.state.explainer._classifier = model
    for _ in range(2):
        with TestClient(app) as client:
            r = client.post("/v1/predict", files={"file": ("a.png", png(200), "image/png")})
            assert r.status_code == 200 and r.json()["predictions"][0]["predicted"] == "bright", r.text
            r = client.post("/v1/explain?class_name=dark", files={"file": ("a.png", png(200), "image/png")})
            assert r.status_code == 200 and r.headers["x-class"] == "dark", r.text


def test_docs_page_uses_only_local_assets():
    """/docs names only this server's URLs (no CDN), each of them answers, the CSP allows only
    'self', and the big assets are revalidated by ETag rather than sent again."""
    import re

    from fastapi.testclient import TestClient

    with TestClient(create_app(StubModel(), ServeConfig(), explain=False)) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self';" in csp and "style-src 'self';" in csp
        assert "unsafe" not in csp and "http" not in csp
        assert "http://" not in page.text and "https://" not in page.text and "<script>" not in page.text  # no inline script
        urls = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assets = [u for u in urls if u.startswith("/docs/assets/")]
        assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css", "/docs/assets/docs.js"} <= set(assets), urls
        for url in urls:
            assert url.startswith("/") and not url.startswith("//"), url
            r = client.get(url)
            assert r.status_code == 200 and r.content, url
        bundle = client.get("/docs/assets/swagger-ui-bundle.js")
        assert bundle.headers["content-type"].startswith("text/javascript") and b"SwaggerUIBundle" in bundle.content
        assert client.get("/docs/assets/swagger-ui.css").headers["content-type"].startswith("text/css")
        start = client.get("/docs/assets/docs.js").text
        assert '"/openapi.json"' in start and "SwaggerUIBundle(" in start
        again = client.get("/docs/assets/swagger-ui-bundle.js", headers={"If-None-Match": bundle.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        for missing in ("/docs/assets/redoc.standalone.js", "/docs/assets/..%2Fcore.py", "/redoc", "/docs/oauth2-redirect"):
            r = client.get(missing)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not-found", missing
        assert client.head("/docs").status_code == 200
