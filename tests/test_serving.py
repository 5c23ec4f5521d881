"""REST API with FastAPI's TestClient: every endpoint and every rejection, micro-batching,
API keys, the optional Grad-CAM endpoint, and uploads that never touch the disk."""

from __future__ import annotations

import asyncio
import io
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from PIL import Image

from imgclf.export.metadata import Decision
from imgclf.predict.onnx_predictor import OnnxClassifier
from imgclf.serve.app import create_app
from imgclf.serve.batching import MicroBatcher
from imgclf.serve.config import ServeConfig
from imgclf.serve.uploads import sniff_image_type


@pytest.fixture(scope="module")
def model(exported) -> OnnxClassifier:
    return OnnxClassifier(exported)


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, ServeConfig(), explain=False)) as c:
        yield c


@pytest.fixture(scope="module")
def images(shapes_root) -> dict[str, Path]:
    return {c: sorted((shapes_root / "test" / c).glob("*.jpg"))[0] for c in ("circle", "square", "triangle")}


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def assert_error(r, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert "\n" not in body["error"]["message"] and "Traceback" not in body["error"]["message"]
    return body


# --------------------------------------------------------------------------- endpoints


def test_healthz_model_page_static_and_docs(client, model):
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/v1/model").json()
    assert info["class_names"] == ["circle", "square", "triangle"] and info["model_id"] == model.model_id
    assert info["engine"] == "onnxruntime" and info["input_size"] == model.input_size == 240 and info["threshold"] is None
    assert info["explain"] is False and info["limits"]["max_upload_mb"] == 10 and info["api_key_required"] is False
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"] and page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    assert 'src="/static/app.js"' in html and 'href="/static/style.css"' in html and 'id="file-input"' in html
    assert "http://" not in html and "https://" not in html  # no CDN, nothing external
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
        assert "http://" not in r.text and "https://" not in r.text
    assert_error(client.get("/static/../serving.py"), 404, "not-found")
    assert_error(client.get("/static/index.html"), 404, "not-found")
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/healthz"} <= set(spec["paths"]) and "/v1/explain" not in spec["paths"]
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["properties"]["file"]["type"] == "array" and body["required"] == ["file"]
    assert_error(client.get("/nope"), 404, "not-found")
    assert_error(client.get("/v1/predict"), 405, "method-not-allowed")


def test_predict_one_image_matches_the_onnx_classifier(client, model, images):
    r = client.post("/v1/predict", files={"file": ("photo.jpg", images["square"].read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["model_id"] == model.model_id and body["engine"] == "onnxruntime"
    assert body["threshold"] is None and body["decision"] == "argmax" and body["class_names"] == ["circle", "square", "triangle"]
    (pred,) = body["predictions"]
    assert pred["filename"] == "photo.jpg" and pred["format"] == "JPEG" and (pred["width"], pred["height"]) == (96, 96)
    want = model.predict_proba([images["square"]])[0]
    got = np.array([pred["probabilities"][c] for c in model.class_names_])
    np.testing.assert_allclose(got, want, atol=1e-6)  # same decoding as the file path
    assert pred["predicted"] == "square" and pred["probability"] == pytest.approx(got.max())


def test_predict_several_images_in_order(client, images):
    files = [("file", (f"{c}.jpg", p.read_bytes(), "image/jpeg")) for c, p in images.items()]
    r = client.post("/v1/predict", files=files, data={"note": "ignored field"})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == ["circle.jpg", "square.jpg", "triangle.jpg"]
    assert [p["predicted"] for p in preds] == ["circle", "square", "triangle"]


def test_type_is_sniffed_from_content_not_name(client, images):
    img = Image.open(images["circle"]).convert("RGB")
    rgba = img.convert("RGBA")
    rgba.putalpha(200)
    for fmt, data in (("PNG", encode(rgba, "PNG")), ("GIF", encode(img, "GIF")), ("WEBP", encode(img, "WEBP", quality=95)), ("BMP", encode(img, "BMP")), ("TIFF", encode(img, "TIFF"))):
        assert sniff_image_type(data) == fmt
        r = client.post("/v1/predict", files={"file": ("notes.txt", data, "text/plain")})
        assert r.status_code == 200, (fmt, r.text)
        assert r.json()["predictions"][0]["format"] == fmt
    gray16 = Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257))
    r = client.post("/v1/predict", files={"file": ("x.png", encode(gray16, "PNG"), "image/png")})
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- rejections


def test_not_an_image_truncated_empty_and_corrupt_are_4xx(client, images):
    jpeg = images["triangle"].read_bytes()
    body = assert_error(client.post("/v1/predict", files={"file": ("photo.jpg", b"just some text, not pixels" * 10, "image/jpeg")}), 415, "not-an-image")
    assert "photo.jpg" in body["error"]["message"]
    assert_error(client.post("/v1/predict", files={"file": ("x.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml")}), 415, "not-an-image")
    assert_error(client.post("/v1/predict", files={"file": ("half.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}), 422, "truncated-image")
    assert_error(client.post("/v1/predict", files={"file": ("empty.jpg", b"", "image/jpeg")}), 400, "empty-file")
    assert_error(client.post("/v1/predict", files={"file": ("bad.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 64, "image/jpeg")}), 422, "corrupt-image")
    png = encode(Image.open(images["circle"]), "PNG")
    assert_error(client.post("/v1/predict", files={"file": ("cut.png", png[:200], "image/png")}), 422, "truncated-image")
    # one bad file fails the request and names it
    files = [("file", ("ok.jpg", jpeg, "image/jpeg")), ("file", ("bad.bin", b"\x00" * 100, "application/octet-stream"))]
    body = assert_error(client.post("/v1/predict", files=files), 415, "not-an-image")
    assert "bad.bin" in body["error"]["message"]


def test_never_500_on_mangled_uploads(client, images):
    rng = np.random.default_rng(0)
    jpeg = bytearray(images["circle"].read_bytes())
    seen = set()
    for i in range(40):
        data = bytearray(jpeg)
        if i % 2:
            data = data[: int(rng.integers(3, len(data)))]
        for _ in range(int(rng.integers(1, 20))):
            data[int(rng.integers(2, len(data)))] = int(rng.integers(0, 256))
        r = client.post("/v1/predict", files={"file": ("m.jpg", bytes(data), "image/jpeg")})
        assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
        seen.add(r.status_code)
    assert seen & {413, 415, 422}  # some were refused


def test_request_shape_rejections(client, images):
    assert_error(client.post("/v1/predict", json={"file": "x"}), 415, "not-multipart")
    assert_error(client.post("/v1/predict", data={"other": "x"}, files={"image": ("a.jpg", images["circle"].read_bytes(), "image/jpeg")}), 400, "no-file")
    bad = b"--XYZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\nabc"  # never closed
    assert_error(client.post("/v1/predict", content=bad, headers={"content-type": "multipart/form-data; boundary=XYZ"}), 400, "bad-multipart")
    assert_error(client.post("/v1/predict", content=b"junk", headers={"content-type": "multipart/form-data; boundary=XYZ"}), 400, "bad-multipart")


def test_size_pixel_and_count_limits(model, images):
    jpeg = images["circle"].read_bytes()
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8))
    big = encode(noise, "PNG")  # ~43 kB
    cfg = ServeConfig(max_upload_mb=0.02, max_pixels=100 * 100, max_files=2)
    with TestClient(create_app(model, cfg, explain=False)) as c:
        body = assert_error(c.post("/v1/predict", files={"file": ("big.png", big, "image/png")}), 413, "file-too-large")
        assert "big.png" in body["error"]["message"] and "0.02 MB" in body["error"]["message"]
        body = assert_error(c.post("/v1/predict", files={"file": ("wide.png", encode(Image.new("RGB", (200, 60)), "PNG"), "image/png")}), 413, "too-many-pixels")
        assert "12,000 pixels" in body["error"]["message"]
        assert c.post("/v1/predict", files={"file": ("ok.jpg", jpeg, "image/jpeg")}).status_code == 200  # 96x96 is fine
        files = [("file", (f"{i}.jpg", jpeg, "image/jpeg")) for i in range(3)]
        assert_error(c.post("/v1/predict", files=files), 413, "too-many-files")
        # a declared body over the request limit is refused before reading it
        r = c.post("/v1/predict", content=b"x" * 200_000, headers={"content-type": "multipart/form-data; boundary=XYZ"})
        assert_error(r, 413, "request-too-large")
        assert c.get("/v1/model").json()["limits"]["max_pixels"] == 10_000
    # the server's own default guard against decompression bombs (pixel count read from the header)
    with TestClient(create_app(model, ServeConfig(max_pixels=1_000_000), explain=False)) as c:
        bomb = encode(Image.new("L", (4000, 4000)), "PNG")  # 16 MP of zeros: a few kB
        assert len(bomb) < 100_000
        assert_error(c.post("/v1/predict", files={"file": ("bomb.png", bomb, "image/png")}), 413, "too-many-pixels")


def test_chunked_body_over_the_limit_is_refused_while_streaming(model):
    cfg = ServeConfig(max_upload_mb=0.01, max_files=1)

    def body():
        yield b"--XYZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n\xff\xd8\xff"
        for _ in range(100):
            yield b"\0" * 4096

    with TestClient(create_app(model, cfg, explain=False)) as c:
        r = c.post("/v1/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=XYZ"})
        assert r.status_code == 413 and r.json()["error"]["code"] in ("file-too-large", "request-too-large")


def test_uploads_are_never_written_to_disk(model, monkeypatch):
    import builtins
    import os
    import tempfile

    import starlette.formparsers


    def forbidden(*a, **k):
        raise AssertionError("an upload touched the disk")

    real_os_open, real_open = os.open, builtins.open

    def guarded_os_open(path, flags, *a, **k):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            forbidden()
        return real_os_open(path, flags, *a, **k)

    def guarded_open(file, mode="r", *a, **k):
        if any(ch in mode for ch in "wax+"):
            forbidden()
        return real_open(file, mode, *a, **k)

    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 256, (900, 900, 3), dtype=np.uint8)), "PNG")
    assert len(data) > 2 * 1024 * 1024  # above Starlette's 1 MB spool-to-disk threshold
    ours = TestClient(create_app(model, ServeConfig(), explain=False))
    naive = FastAPI()  # the usual way (request.form() / UploadFile) spools big uploads to a temp file

    @naive.post("/form")
    async def form(request: Request):
        return {"n": len(await (await request.form())["file"].read())}

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, forbidden)
    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", forbidden)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(builtins, "open", guarded_open)
    with ours as c:
        r = c.post("/v1/predict", files={"file": ("noise.png", data, "image/png")})
    with pytest.raises(AssertionError, match="touched the disk"):  # the guard does catch spooling
        TestClient(naive).post("/form", files={"file": ("noise.png", data, "image/png")})
    monkeypatch.undo()
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- API key


def test_api_key_missing_wrong_and_right(model, images):
    jpeg = images["circle"].read_bytes()
    with TestClient(create_app(model, ServeConfig(api_key="s3cret-ключ"), explain=False)) as c:
        assert_error(c.get("/v1/model"), 401, "missing-api-key")
        assert_error(c.get("/v1/model", headers={"X-API-Key": "s3cret"}), 401, "wrong-api-key")
        r = c.post("/v1/predict", files={"file": ("a.jpg", jpeg, "image/jpeg")}, headers={"X-API-Key": "wrong"})
        assert_error(r, 401, "wrong-api-key")
        assert r.headers["www-authenticate"] == "ApiKey"
        assert_error(c.post("/v1/predict", files={"file": ("a.jpg", jpeg, "image/jpeg")}), 401, "missing-api-key")
        key = {"X-API-Key": "s3cret-ключ".encode()}  # a UTF-8 key, sent as raw header bytes
        assert c.get("/v1/model", headers=key).json()["api_key_required"] is True
        assert c.post("/v1/predict", files={"file": ("a.jpg", jpeg, "image/jpeg")}, headers=key).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200  # page and liveness stay open
        spec = c.get("/openapi.json").json()
        assert spec["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"


def test_api_key_is_compared_in_constant_time(model, monkeypatch):
    import hmac

    import imgclf.serve.security as serving

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(serving.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    with TestClient(create_app(model, ServeConfig(api_key="k1"), explain=False)) as c:
        c.get("/v1/model", headers={"X-API-Key": "k2"})
    assert calls == [(b"k2", b"k1")]


def test_config_validation():
    for bad in (dict(max_upload_mb=0), dict(max_pixels=0), dict(batch_wait_ms=-1), dict(max_batch=0), dict(max_files=0), dict(api_key=" ")):
        with pytest.raises(ValueError):
            ServeConfig(**bad).validate()


# --------------------------------------------------------------------------- batching and threshold


class _StubModel:
    """A binary model with a stored threshold, recording the batches it is given."""

    def __init__(self, threshold=0.25, delay=0.0):
        from imgclf.backbones.specs import Preprocessing

        self.class_names_ = ["benign", "malignant"]
        self.decision = Decision.from_meta({"class_names": self.class_names_, "threshold": threshold, "positive_class": "malignant"})
        self.preprocessing = Preprocessing(input_size=32, resize_size=36)
        self.model_id = "stub"
        self.engine = "stub"
        self.batches: list[int] = []
        self.delay = delay

    def predict_proba_arrays(self, batch):
        import time

        self.batches.append(len(batch))
        time.sleep(self.delay)
        mean = batch.reshape(len(batch), -1).mean(1) / 255.0  # brighter image → more "malignant"
        return np.stack([1 - mean, mean], 1).astype(np.float32)

    def info(self):
        return {"model_id": self.model_id, "engine": self.engine, "class_names": self.class_names_, "input_size": 32, "threshold": self.decision.to_dict(), "decision": self.decision.description}


def _gray(value: int) -> bytes:
    return encode(Image.new("RGB", (40, 40), (value, value, value)), "PNG")


def test_threshold_is_used_and_reported():
    stub = _StubModel(threshold=0.25)
    with TestClient(create_app(stub, ServeConfig(), explain=False)) as c:
        r = c.post("/v1/predict", files=[("file", ("dark.png", _gray(20), "image/png")), ("file", ("mid.png", _gray(90), "image/png"))])
    body = r.json()
    assert body["threshold"] == 0.25 and body["positive_class"] == "malignant" and body["decision"] == "P(malignant) >= 0.25"
    p = [b["probabilities"]["malignant"] for b in body["predictions"]]
    assert p[0] < 0.25 < p[1] < 0.5
    assert [b["predicted"] for b in body["predictions"]] == ["benign", "malignant"]  # argmax would say benign twice


def test_concurrent_requests_are_micro_batched():
    import httpx

    stub = _StubModel(delay=0.05)
    app = create_app(stub, ServeConfig(batch_wait_ms=100, max_batch=16), explain=False)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            rs = await asyncio.gather(*[client.post("/v1/predict", files={"file": (f"{v}.png", _gray(v), "image/png")}) for v in range(0, 240, 20)])
        return rs

    rs = asyncio.run(run())
    assert all(r.status_code == 200 for r in rs)
    got = [r.json()["predictions"][0]["probabilities"]["malignant"] for r in rs]
    np.testing.assert_allclose(got, [v / 255 for v in range(0, 240, 20)], atol=0.02)  # each caller got its own row
    assert sum(stub.batches) == 12 and max(stub.batches) > 1 and len(stub.batches) < 12
    app.state.batcher.close()


def test_micro_batcher_limits_and_errors():
    seen = []

    def fn(batch):
        seen.append(len(batch))
        if (batch == 99).any():
            raise RuntimeError("model failed")
        return batch[:, :1].astype(np.float32) * 2

    async def run():
        mb = MicroBatcher(fn, max_batch=3, wait_ms=50)
        outs = await asyncio.gather(*[mb.submit(np.full((1, 2), i)) for i in range(7)])
        with pytest.raises(RuntimeError, match="model failed"):
            await mb.submit(np.full((1, 2), 99))
        big = await mb.submit(np.arange(10).reshape(5, 2))  # one request larger than max_batch runs whole
        mb.close()
        return outs, big

    outs, big = asyncio.run(run())
    assert [float(o[0, 0]) for o in outs] == [2.0 * i for i in range(7)]
    assert seen[:3] == [3, 3, 1] and seen[-1] == 5
    assert big[:, 0].tolist() == [0, 4, 8, 12, 16]


# --------------------------------------------------------------------------- Grad-CAM endpoint


def _fake_explain():
    mod = types.ModuleType("imgclf.explain.gradcam")
    calls = []

    def gradcam(clf, image, class_name=None):
        calls.append((image.size, class_name))
        k = 1 if class_name is None else clf.class_names_.index(class_name)
        return np.linspace(0, 1, 224 * 224, dtype=np.float32).reshape(224, 224), k, 0.75

    def overlay(image, heatmap):
        return Image.fromarray((np.asarray(heatmap) * 255).astype(np.uint8)).convert("RGB")

    mod.gradcam, mod.overlay, mod.calls = gradcam, overlay, calls
    return mod


def test_explain_endpoint_present_only_with_the_module(model, exported, images, monkeypatch):
    jpeg = images["square"].read_bytes()
    fake = _fake_explain()
    with TestClient(create_app(model, ServeConfig(), bundle_dir=exported, explain=fake)) as c:
        assert c.get("/v1/model").json()["explain"] is True
        assert "/v1/explain" in c.get("/openapi.json").json()["paths"]
        r = c.post("/v1/explain", files={"file": ("sq.jpg", jpeg, "image/jpeg")})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.headers["x-class"] == "square" and float(r.headers["x-probability"]) == 0.75
        assert Image.open(io.BytesIO(r.content)).size == (224, 224)  # the fake heatmap's size
        r = c.post("/v1/explain?class_name=triangle", files={"file": ("sq.jpg", jpeg, "image/jpeg")})
        assert r.headers["x-class"] == "triangle" and fake.calls[-1] == ((96, 96), "triangle")
        assert_error(c.post("/v1/explain?class_name=dog", files={"file": ("sq.jpg", jpeg, "image/jpeg")}), 400, "unknown-class")
        assert_error(c.post("/v1/explain", files={"file": ("x.txt", b"hello", "text/plain")}), 415, "not-an-image")
        two = [("file", ("a.jpg", jpeg, "image/jpeg")), ("file", ("b.jpg", jpeg, "image/jpeg"))]
        assert_error(c.post("/v1/explain", files=two), 400, "one-file")
    # module not importable → no endpoint at all
    monkeypatch.setitem(sys.modules, "imgclf.explain.gradcam", None)
    from imgclf.serve.explainer import explain_module

    assert explain_module() is None
    with TestClient(create_app(model, ServeConfig(), bundle_dir=exported)) as c:
        assert c.get("/v1/model").json()["explain"] is False
        assert "/v1/explain" not in c.get("/openapi.json").json()["paths"]
        assert_error(c.post("/v1/explain", files={"file": ("sq.jpg", jpeg, "image/jpeg")}), 404, "not-found")


def test_explain_with_the_real_module(model, exported, images):
    from imgclf.serve.explainer import explain_module

    if explain_module() is None:
        pytest.skip("imgclf.explain.gradcam is not available in this tree")
    with TestClient(create_app(model, ServeConfig(), bundle_dir=exported)) as c:
        r = c.post("/v1/explain", files={"file": ("sq.jpg", images["square"].read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    assert r.headers["x-class"] in model.class_names_ and 0 <= float(r.headers["x-probability"]) <= 1
    assert Image.open(io.BytesIO(r.content)).size == (240, 240)  # the default pair's input crop


def test_serving_model_loading_and_cli_errors(exported, tmp_path, capsys):
    import socket

    from imgclf.cli.main import main
    from imgclf.serve.app import load_serving_model
    from imgclf.serve.server import bind_socket

    clf, bundle = load_serving_model(exported / "model.onnx")
    assert isinstance(clf, OnnxClassifier) and bundle == exported  # explain possible: the bundle matches the export
    clf, bundle = load_serving_model(exported)
    assert isinstance(clf, OnnxClassifier) and bundle == exported
    with pytest.raises(ValueError, match="--engine torch"):
        load_serving_model(exported / "model.onnx", "torch")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)
        for argv, needle in (
            (["serve", str(exported), "--port", str(port)], "cannot listen"),
            (["serve", str(tmp_path / "nope")], "no model.json"),
            (["serve", str(tmp_path / "nope.onnx")], "no such ONNX"),
        ):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert err[-1].startswith("imgclf: error:") and needle in err[-1], err
    finally:
        taken.close()
    for bad in (["--port", "70000"], ["--max-upload-mb", "0"], ["--batch-wait-ms", "-1"], ["--max-batch", "0"]):
        assert main(["serve", str(exported), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("imgclf: error:") and bad[0] in err[0], err


def test_auto_serves_the_feature_path_where_it_measured_faster(trained_run, exported, images, tmp_path, monkeypatch):
    """serve --engine auto takes predict's measured choice: here any gain is enough, so the
    feature path, which answers like the export (within the auto parity bound) and whose
    Classifier also searches the similar cases; a stored choice is read back, not measured."""
    from conftest import bundle_copy
    from imgclf.predict import choose
    from imgclf.predict.feature_arrays import FeatureArrayClassifier
    from imgclf.serve.app import load_serving_model

    d = bundle_copy(trained_run, tmp_path / "m", export_from=exported)
    monkeypatch.setenv("IMGCLF_AUTO_SWITCH_GAIN", "0")
    served, bundle = load_serving_model(d, cache_dir=tmp_path / "c")
    assert isinstance(served, FeatureArrayClassifier) and bundle == d
    info = served.info()
    assert info["engine"].startswith("features (") and info["engine_choice"]["features_img_s"] > 0
    export, _ = load_serving_model(d, "onnx", cache_dir=tmp_path / "c")
    assert isinstance(export, OnnxClassifier)
    with TestClient(create_app(served, ServeConfig(), bundle_dir=bundle, explain=False)) as c:
        assert c.app.state.similar.classifier is served.clf  # one backbone for predictions and similar cases
        r = c.post("/v1/predict?neighbors=2", files={"file": ("s.jpg", images["square"].read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    got = np.array([pred["probabilities"][k] for k in served.class_names_])
    want = export.predict_proba([images["square"]])[0]
    assert np.abs(got - want).max() <= choose.AUTO_PARITY_ATOL and got.argmax() == want.argmax() and len(pred["neighbors"]) == 2
    monkeypatch.setattr(choose, "measure_engines", lambda *a, **k: pytest.fail("measured twice"))
    assert isinstance(load_serving_model(d, cache_dir=tmp_path / "c")[0], FeatureArrayClassifier)
    monkeypatch.undo()  # the session's IMGCLF_AUTO_SWITCH_GAIN=inf: measured under a new cache, the export kept
    assert isinstance(load_serving_model(d, cache_dir=tmp_path / "c3")[0], OnnxClassifier)
