"""Similar training cases over HTTP: ``/v1/predict?neighbors=K``, the thumbnail endpoint, the
server's bound and path option, models without an index, the one inference thread, and the
web page's strip of similar cases in a real browser (IMGCLF_SCREENSHOT_DIR keeps its screenshot)."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
from importlib.util import find_spec
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import browser_available, launch_chromium, serve_process, watched_page
from imgclf.config import layout
from imgclf.predict.onnx_predictor import OnnxClassifier
from imgclf.serve.app import create_app, load_serving_model
from imgclf.serve.config import ServeConfig


@pytest.fixture(scope="module")
def indexed(exported, trained_run, tmp_path_factory) -> Path:
    """The exported model (ONNX graph included) with its similar-cases index files: served by
    ONNX Runtime, its neighbours by the feature path."""
    d = tmp_path_factory.mktemp("indexed") / "model"
    shutil.copytree(exported, d)
    for name in (layout.NEIGHBORS_TENSORS, layout.NEIGHBORS_META):
        shutil.copy2(trained_run / name, d / name)
    return d


@pytest.fixture(scope="module")
def without_index(indexed, tmp_path_factory) -> dict[str, Path]:
    """Copies of the model whose index cannot be served: files gone though model.json lists
    them, and model.json without an index at all (as --no-neighbors or an older imgclf saves)."""
    base = tmp_path_factory.mktemp("without-index")
    gone, unlisted = base / "files-gone", base / "unlisted"
    for d in (gone, unlisted):
        shutil.copytree(indexed, d)
        for name in (layout.NEIGHBORS_TENSORS, layout.NEIGHBORS_META):
            (d / name).unlink()
    meta = json.loads((unlisted / layout.MODEL_META).read_text())
    del meta["neighbors"]
    (unlisted / layout.MODEL_META).write_text(json.dumps(meta))
    return {"files-gone": gone, "unlisted": unlisted}


@pytest.fixture(scope="module")
def n_cases(indexed) -> int:
    """How many cases the index holds (test_neighbors counts them against the run's split.csv)."""
    return json.loads((indexed / layout.MODEL_META).read_text())["neighbors"]["count"]


@pytest.fixture(scope="module")
def served(indexed):
    return load_serving_model(indexed)


@pytest.fixture(scope="module")
def client(served):
    model, bundle = served
    with TestClient(create_app(model, ServeConfig(max_neighbors=5), bundle_dir=bundle, explain=False)) as c:
        yield c


def train_images(shapes_root: Path) -> dict[str, Path]:
    return {c: sorted((shapes_root / "train" / c).glob("*.jpg"))[0] for c in ("circle", "square", "triangle")}


def upload(path: Path):
    return {"file": (path.name, path.read_bytes(), "image/jpeg")}


def assert_error(r, status: int, code: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert "\n" not in body["error"]["message"] and "Traceback" not in body["error"]["message"]
    return body["error"]["message"]


def test_predict_returns_the_nearest_training_images(client, served, n_cases, shapes_root):
    model, _ = served
    assert isinstance(model, OnnxClassifier)  # probabilities from the export, neighbours from the feature path
    info = client.get("/v1/model").json()["neighbors"]
    assert info == {"available": True, "cases": n_cases, "max_neighbors": 5, "paths": False, "reason": None}
    images = train_images(shapes_root)
    r = client.post("/v1/predict?neighbors=3", files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in images.values()])
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 3
    for (cls, path), pred in zip(images.items(), preds):
        cases = pred["neighbors"]
        assert len(cases) == 3 and set(cases[0]) == {"index", "label", "similarity", "path", "thumbnail_url"}
        assert cases[0]["label"] == cls and cases[0]["similarity"] > 0.99  # a training image's nearest case is itself
        sims = [c["similarity"] for c in cases]
        assert sims == sorted(sims, reverse=True) and all(-1.0 <= s <= 1.0001 for s in sims)
        assert all(c["path"] is None for c in cases)  # paths are off unless the server says otherwise
        assert all(c["thumbnail_url"] == f"/v1/neighbors/{c['index']}/thumbnail" for c in cases)
        assert len({c["index"] for c in cases}) == 3
    plain = client.post("/v1/predict", files=upload(images["circle"])).json()["predictions"][0]
    assert plain["neighbors"] is None and plain["predicted"] == preds[0]["predicted"]
    assert client.post("/v1/predict?neighbors=0", files=upload(images["circle"])).json()["predictions"][0]["neighbors"] is None


def test_neighbors_is_bounded_and_checked(client, n_cases, shapes_root):
    image = train_images(shapes_root)["square"]
    msg = assert_error(client.post("/v1/predict?neighbors=6", files=upload(image)), 422, "invalid-request")
    assert "at most 5" in msg
    assert_error(client.post("/v1/predict?neighbors=-1", files=upload(image)), 422, "invalid-request")
    assert_error(client.post("/v1/predict?neighbors=lots", files=upload(image)), 422, "invalid-request")
    assert len(client.post("/v1/predict?neighbors=5", files=upload(image)).json()["predictions"][0]["neighbors"]) == 5
    spec = client.get("/openapi.json").json()
    (param,) = [p for p in spec["paths"]["/v1/predict"]["post"]["parameters"] if p["name"] == "neighbors"]
    assert param["in"] == "query" and param["schema"]["minimum"] == 0 and param["schema"]["maximum"] == 5
    thumb = spec["paths"]["/v1/neighbors/{index}/thumbnail"]["get"]
    assert thumb["parameters"][0]["schema"]["maximum"] == n_cases - 1 and "image/jpeg" in thumb["responses"]["200"]["content"]


def test_thumbnail_endpoint_serves_the_stored_jpeg(client, served, n_cases, shapes_root):
    case = client.post("/v1/predict?neighbors=1", files=upload(train_images(shapes_root)["triangle"])).json()["predictions"][0]["neighbors"][0]
    r = client.get(case["thumbnail_url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content[:3] == b"\xff\xd8\xff"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "JPEG" and max(img.size) <= 64
    assert r.headers["cache-control"] == "private, max-age=3600" and served[0].model_id in r.headers["etag"]
    assert r.headers["x-content-type-options"] == "nosniff"
    again = client.get(case["thumbnail_url"], headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    head = client.head(case["thumbnail_url"])
    assert head.status_code == 200 and head.content == b"" and head.headers["content-type"] == "image/jpeg"
    for bad in (n_cases, 10_000, -1):
        assert_error(client.get(f"/v1/neighbors/{bad}/thumbnail"), 404, "not-found")
    assert_error(client.get("/v1/neighbors/x/thumbnail"), 422, "invalid-request")


def test_paths_only_when_the_server_says_so_and_the_key_guards_thumbnails(served, shapes_root):
    model, bundle = served
    image = train_images(shapes_root)["circle"]
    config = ServeConfig(api_key="nb-key", neighbor_paths=True, max_neighbors=2)
    with TestClient(create_app(model, config, bundle_dir=bundle, explain=False)) as c:
        assert c.get("/v1/model", headers={"X-API-Key": "nb-key"}).json()["neighbors"]["paths"] is True
        assert_error(c.post("/v1/predict?neighbors=1", files=upload(image)), 401, "missing-api-key")
        case = c.post("/v1/predict?neighbors=1", files=upload(image), headers={"X-API-Key": "nb-key"}).json()["predictions"][0]["neighbors"][0]
        assert Path(case["path"]) == image  # the training path as stored
        assert_error(c.get(case["thumbnail_url"]), 401, "missing-api-key")
        assert_error(c.get(case["thumbnail_url"], headers={"X-API-Key": "wrong"}), 401, "wrong-api-key")
        assert c.get(case["thumbnail_url"], headers={"X-API-Key": "nb-key"}).content[:2] == b"\xff\xd8"


def test_torch_engine_searches_with_its_own_classifier(indexed, shapes_root):
    """--engine torch: the TorchClassifier's Classifier gives the features (no second model)."""
    model, bundle = load_serving_model(indexed, "torch")
    app = create_app(model, ServeConfig(max_neighbors=3), bundle_dir=bundle, explain=False)
    assert app.state.similar.classifier is model.clf
    with TestClient(app) as c:
        cases = c.post("/v1/predict?neighbors=3", files=upload(train_images(shapes_root)["triangle"])).json()["predictions"][0]["neighbors"]
    assert len(cases) == 3 and cases[0]["label"] == "triangle" and cases[0]["similarity"] > 0.99


def test_neighbour_search_runs_in_the_inference_thread(served, shapes_root):
    model, bundle = served
    app = create_app(model, ServeConfig(max_neighbors=2), bundle_dir=bundle, explain=False)
    threads = []
    for batcher in (app.state.batcher, app.state.neighbor_batcher):
        def noting(batch, fn=batcher.fn):
            threads.append(threading.current_thread())
            return fn(batch)
        batcher.fn = noting
    with TestClient(app) as c:
        r = c.post("/v1/predict?neighbors=2", files=upload(train_images(shapes_root)["square"]))
        assert r.status_code == 200 and len(r.json()["predictions"][0]["neighbors"]) == 2
    assert len(threads) == 2 and threads[0] is threads[1] and threads[0].name.startswith("imgclf-infer")
    assert threads[0] is not threading.main_thread()


def test_models_without_an_index_say_so(without_index, served, shapes_root):
    image = train_images(shapes_root)["circle"]
    model, bundle = served
    cases = [
        (create_app(model, ServeConfig(), explain=False), "no similar-cases index"),  # no bundle folder given
        (create_app(model, ServeConfig(), bundle_dir=without_index["unlisted"], explain=False), "no similar-cases index (trained with --no-neighbors"),
        (create_app(model, ServeConfig(), bundle_dir=without_index["files-gone"], explain=False), "missing"),
        (create_app(model, ServeConfig(max_neighbors=0), bundle_dir=bundle, explain=False), "turned off"),
    ]
    for app, says in cases:
        with TestClient(app) as c:
            info = c.get("/v1/model").json()["neighbors"]
            assert info["available"] is False and info["cases"] is None and says in info["reason"], info
            msg = assert_error(c.post("/v1/predict?neighbors=3", files=upload(image)), 400, "no-similar-cases")
            assert says in msg
            assert c.post("/v1/predict", files=upload(image)).json()["predictions"][0]["neighbors"] is None
            assert_error(c.get("/v1/neighbors/0/thumbnail"), 404, "not-found")
            spec = c.get("/openapi.json").json()
            assert "/v1/neighbors/{index}/thumbnail" not in spec["paths"]
            (param,) = [p for p in spec["paths"]["/v1/predict"]["post"]["parameters"] if p["name"] == "neighbors"]
            assert param["schema"]["maximum"] == 0


# --------------------------------------------------------------------------- the web page


@pytest.fixture(scope="module")
def live_server(indexed, tmp_path_factory):
    """`python -m imgclf serve MODEL --port 0` on the indexed model; yields its base url."""
    with serve_process(indexed, tmp_path_factory.mktemp("serve-neighbors-log")) as (base, _):
        yield base


@pytest.mark.skipif(not browser_available(), reason="needs Debian's chromium and the playwright package")
def test_page_shows_similar_training_cases(live_server, shapes_root, tmp_path):
    image = sorted((shapes_root / "train" / "square").glob("*.jpg"))[1]
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page, requests, console_errors = watched_page(browser, 1200, 900)
            page.goto(live_server, timeout=30_000)
            page.wait_for_selector("#model-line:has-text('circle')", timeout=30_000)
            assert page.is_hidden("#neighbors")
            page.set_input_files("#file-input", str(image))
            page.wait_for_selector("#neighbors:not([hidden])", timeout=60_000)
            # a locator wait, not wait_for_function: its polling evaluates a string in the page, which the CSP forbids
            expect(page.locator('#neighbor-list img[src^="blob:"]')).to_have_count(5, timeout=30_000)
            items = page.query_selector_all("#neighbor-list li")
            assert len(items) == 5
            assert items[0].get_attribute("data-label") == "square" and float(items[0].get_attribute("data-similarity")) > 0.99
            assert [i.text_content() for i in page.query_selector_all("#neighbor-list .neighbor-label")][0] == "square"
            assert all("similarity" in i.text_content() for i in page.query_selector_all("#neighbor-list .neighbor-similarity"))
            widths = page.evaluate("Array.from(document.querySelectorAll('#neighbor-list img')).map(i => i.naturalWidth)")
            assert all(w > 0 for w in widths), widths  # decoded, not a broken image
            shots = Path(os.environ.get("IMGCLF_SCREENSHOT_DIR") or tmp_path)
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "serve-page-neighbors.png"), full_page=True)
        finally:
            browser.close()
    assert any("/v1/predict?neighbors=5" in u for u in requests), requests
    assert sum("/v1/neighbors/" in u for u in requests) == 5
    assert not console_errors, console_errors
    outside = [u for u in requests if not (u.startswith(live_server) or u.startswith(("data:", "blob:")))]
    assert not outside, outside


# --------------------------------------------------------------------------- the HTTP layer on a stand-in index


class StubIndexedModel:
    """The robustness tests' two-class stub model with a ``clf`` that has a real
    :class:`~imgclf.model.neighbors.NeighborIndex` (features: the mean colour), as a
    TorchClassifier has: the HTTP layer without a backbone, so it can be fuzzed in seconds.
    Case 5 has no stored thumbnail unless ``all_thumbnails``."""

    def __new__(cls, all_thumbnails: bool = True):
        import numpy as np

        from imgclf.model.neighbors import NeighborIndex
        from test_serve_robustness import StubModel

        model = StubModel()
        grey = [0, 50, 100, 150, 200, 250]

        def jpeg(v: int) -> bytes:
            buf = io.BytesIO()
            Image.new("RGB", (12, 8), (v, v, v)).save(buf, format="JPEG")
            return buf.getvalue()

        thumbs = [jpeg(v) for v in grey[:5]] + [jpeg(grey[5]) if all_thumbnails else b""]
        features = np.array([[v + 1.0, 255.0 - v + 1.0] for v in grey])  # direction encodes brightness
        index = NeighborIndex(features, [int(v >= 128) for v in grey], [f"/data/train/img{i}.jpg" for i in range(6)], model.class_names_, thumbs, thumbnail_px=12)

        class Clf:
            meta_ = type("Meta", (), {"neighbors": {"count": 6}})()

            def neighbor_index(self):
                return index

            def backbone_runner(self):
                return type("Runner", (), {"get": staticmethod(lambda: None)})()

            def neighbors_of_arrays(self, batch, k):
                mean = batch.reshape(len(batch), -1).mean(1, keepdims=True).astype(np.float64)
                return index.neighbors(np.concatenate([mean + 1.0, 256.0 - mean], 1), k)

        model.clf = Clf()
        return model


def test_stand_in_index_brightness_neighbours_and_a_missing_thumbnail():
    from test_serve_robustness import png

    with TestClient(create_app(StubIndexedModel(all_thumbnails=False), ServeConfig(max_neighbors=6), explain=False)) as c:
        assert c.get("/v1/model").json()["neighbors"]["cases"] == 6
        cases = c.post("/v1/predict?neighbors=6", files={"file": ("a.png", png(240), "image/png")}).json()["predictions"][0]["neighbors"]
        assert [x["index"] for x in cases[:2]] == [5, 4] and cases[0]["label"] == "bright"
        assert cases[0]["thumbnail_url"] is None and cases[1]["thumbnail_url"] == "/v1/neighbors/4/thumbnail"
        assert_error(c.get("/v1/neighbors/5/thumbnail"), 404, "no-thumbnail")
        assert c.get("/v1/neighbors/4/thumbnail").content[:2] == b"\xff\xd8"


def neighbour_fuzz_schema(api_key: str | None):
    """The document of a server with similar cases (the thumbnail endpoint, a non-zero
    ``neighbors`` bound), its two neighbour operations, with test_serve_fuzz.py's settings."""
    from test_serve_fuzz import fuzz_config

    config = ServeConfig(api_key=api_key, max_upload_mb=0.25, max_files=3, max_pixels=1_000_000, max_neighbors=4)
    app = create_app(StubIndexedModel(), config, explain=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=fuzz_config(api_key))
    return schema.include(path_regex="^/v1/(predict|neighbors/)")


fuzz_answers: list[tuple[str, str, int]] = []

if find_spec("schemathesis") is not None:
    import schemathesis
    from test_serve_fuzz import API_KEY, FUZZ_SETTINGS

    @neighbour_fuzz_schema(None).parametrize()
    @FUZZ_SETTINGS
    def test_generated_neighbour_requests_get_documented_answers(case):
        response = case.call_and_validate()  # test_serve_fuzz.py's checks: no 5xx, documented statuses, bodies, headers
        fuzz_answers.append(("open", case.operation.path, response.status_code))
        assert response.status_code < 500, (response.status_code, response.text[:300])

    @neighbour_fuzz_schema(API_KEY).parametrize()
    @FUZZ_SETTINGS
    def test_generated_neighbour_requests_with_an_api_key_get_documented_answers(case):
        response = case.call_and_validate()
        fuzz_answers.append(("api-key", case.operation.path, response.status_code))
        assert response.status_code < 500, (response.status_code, response.text[:300])

    def test_neighbour_fuzzing_reached_both_endpoints():
        """Each neighbour operation of each app answered 200 at least once."""
        if not fuzz_answers:
            pytest.skip("runs after the fuzz tests of this module")
        ok = {(w, p) for w, p, status in fuzz_answers if status == 200}
        assert ok == {(w, p) for w in ("open", "api-key") for p in ("/v1/predict", "/v1/neighbors/{index}/thumbnail")}, sorted(set(fuzz_answers))
