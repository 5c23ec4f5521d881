"""Similar cases: the neighbour index stored with a model, its search, its files' integrity,
``predict --neighbors`` and the report's nearest training cases."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
from conftest import bundle_copy
from PIL import Image

from imgclf.cli.main import main
from imgclf.config import layout
from imgclf.model import neighbors as nb
from imgclf.model.classifier import Classifier
from imgclf.model.metadata import BundleError


def _clustered(n: int, dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    labels = rng.integers(0, clusters, n)
    return centres[labels] + 0.3 * rng.normal(size=(n, dim)).astype(np.float32), labels


def _brute_force(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    b = base / np.linalg.norm(base, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ b.T.astype(np.float64)
    return np.array([sorted(range(len(b)), key=lambda j: -row[j])[:k] for row in sims])


def _index(features: np.ndarray, labels: np.ndarray, n_classes: int) -> nb.NeighborIndex:
    return nb.NeighborIndex(features, labels, [f"img{i}.jpg" for i in range(len(labels))], [f"c{c}" for c in range(n_classes)],
                            [b""] * len(labels), thumbnail_px=0)


def test_exact_search_returns_the_true_nearest_cases():
    base, labels = _clustered(500, 32, 5, seed=1)
    queries = np.random.default_rng(2).normal(size=(40, 32)).astype(np.float32)
    index = _index(base, labels, 5)
    assert index.method == "exact"
    sims, idx = index.search(queries, 4)
    np.testing.assert_array_equal(idx, _brute_force(base, queries, 4))
    assert np.all(np.diff(sims, axis=1) <= 0) and sims.max() <= 1.0 + 1e-5
    # a stored vector is its own nearest case, with similarity 1
    found = index.neighbors(base[[7, 123]] * 3.0, 1)  # scale does not matter: cosine
    assert [f[0].index for f in found] == [7, 123]
    assert found[0][0].similarity == pytest.approx(1.0, abs=1e-5) and found[0][0].label == f"c{labels[7]}"
    assert len(index.search(queries[:1], 10_000)[1][0]) == 500  # k above n: all, best first


def test_ann_search_finds_the_true_nearest_cases(monkeypatch):
    base, labels = _clustered(6000, 48, 40, seed=3)
    queries, _ = _clustered(200, 48, 40, seed=3)  # same centres (same seed), fresh points
    queries = queries + 0.05 * np.random.default_rng(4).normal(size=queries.shape).astype(np.float32)
    monkeypatch.setattr(nb, "EXACT_SEARCH_MAX", 1000)
    index = _index(base, labels, 40)
    assert index.method == "faiss-ivf"
    _, idx = index.search(queries, 5)
    truth = _brute_force(base, queries, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(idx, truth)])
    assert recall >= 0.95
    assert np.mean(idx[:, 0] == truth[:, 0]) >= 0.97


def test_stratified_subsample_keeps_every_class_and_the_limit():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    keep = nb.stratified_subsample(labels, 100, seed=0)
    assert len(keep) == 100 and len(set(keep.tolist())) == 100
    counts = np.bincount(labels[keep], minlength=3)
    assert counts.tolist() == [90, 9, 1]
    np.testing.assert_array_equal(keep, nb.stratified_subsample(labels, 100, seed=0))  # seeded
    assert len(nb.stratified_subsample(labels, 5000, seed=0)) == 1000


def test_index_files_round_trip_with_thumbnails(tmp_path):
    pic = tmp_path / "a.png"
    Image.new("RGB", (200, 100), (200, 30, 30)).save(pic)
    base, labels = _clustered(3, 16, 2, seed=5)
    labels = labels % 2
    index = nb.NeighborIndex.build(base, labels, [str(pic), str(pic), str(tmp_path / "gone.jpg")], ["x", "y"], thumbnail_px=32, training_images=10)
    entry = index.save(tmp_path)
    back = nb.NeighborIndex.load(tmp_path, entry, ["x", "y"])
    assert back.paths == index.paths and back.training_images == 10 and back.labels.tolist() == labels.tolist()
    thumb = Image.open(io.BytesIO(back.thumbnail(0)))
    assert thumb.format == "JPEG" and max(thumb.size) == 32
    assert back.thumbnail(2) == b""  # unreadable at build time: no picture, still a case
    np.testing.assert_allclose(back.features, nb.normalise(base), atol=2e-3)  # stored as float16


# ---------------------------------------------------------------------------- with a trained model


def _with_index(run, dest):
    d = bundle_copy(run, dest)
    for name in (layout.NEIGHBORS_TENSORS, layout.NEIGHBORS_META):
        shutil.copy2(run / name, d / name)
    return d


def test_a_train_run_stores_the_index_and_predict_gives_neighbours(trained_run, shapes_root, tmp_path, capsys):
    meta = json.loads((trained_run / layout.MODEL_META).read_text())
    split = list(csv.reader(io.StringIO((trained_run / layout.SPLIT).read_text())))
    # the default refits its heads on train + validation: those are the cases it learned from
    train_paths = {r[2] for r in split[1:] if r[0] in ("train", "validation")}
    entry = meta["neighbors"]
    refit = json.loads((trained_run / layout.CONFIG).read_text())["fit_summary"]["refit"]
    assert refit["images"] == entry["count"] == entry["training_images"] == len(train_paths) == 36 + 12
    assert (trained_run / layout.NEIGHBORS_TENSORS).is_file() and entry["thumbnail_px"] == 64

    out = tmp_path / "pred.csv"
    assert main(["-q", "predict", str(trained_run), str(shapes_root / "test"), "--neighbors", "2", "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 18
    assert list(rows[0])[-6:] == ["neighbor1_path", "neighbor1_label", "neighbor1_similarity", "neighbor2_path", "neighbor2_label", "neighbor2_similarity"]
    for r in rows:
        assert {r["neighbor1_path"], r["neighbor2_path"]} <= train_paths
        assert r["neighbor1_label"] in ("circle", "square", "triangle")
        assert 1.0 + 1e-5 >= float(r["neighbor1_similarity"]) >= float(r["neighbor2_similarity"])
    # the shapes are easy: the nearest training case carries the image's own class almost always
    agree = np.mean([r["neighbor1_label"] == r["path"].split("/")[-2] for r in rows])
    assert agree >= 0.8

    # the Python API: the same neighbours; the search uses the features predict computes
    clf = Classifier.load(trained_run)
    found = clf.neighbors([rows[0]["path"], str(tmp_path / "missing.jpg")], k=2)
    assert [c.path for c in found[0]] == [rows[0]["neighbor1_path"], rows[0]["neighbor2_path"]]
    assert found[1] is None and str(tmp_path / "missing.jpg") in clf.errors_
    thumb = clf.neighbor_index().thumbnail(found[0][0].index)
    assert Image.open(io.BytesIO(thumb)).format == "JPEG"
    # a neighbour of a training image is itself, with similarity 1 (same preprocessing, same backbone)
    own = sorted(train_paths)[0]
    first = clf.neighbors([own], k=1)[0][0]
    assert first.path == own and first.similarity == pytest.approx(1.0, abs=2e-3)
    # pixels in (what a server has after decoding an upload): the same cases
    from imgclf.data.preprocess import decode_array

    pixels = np.stack([decode_array(p, clf.backbone_runner().spec.preprocessing)[0] for p in (own, rows[0]["path"])])
    by_pixels = clf.neighbors_of_arrays(pixels, k=2)
    assert by_pixels[0][0].path == own and [c.path for c in by_pixels[1]] == [c.path for c in found[0]]


def test_opt_out_stores_no_index_and_neighbors_says_so(shapes_root, tmp_path, capsys):
    from imgclf.train.classifier import ImageClassifier

    clf = ImageClassifier(recipe="fast", epochs=2, neighbors=False).fit(shapes_root)
    assert clf.neighbors_ is None
    d = clf.save(tmp_path / "m")
    assert not (d / layout.NEIGHBORS_TENSORS).exists() and "neighbors" not in json.loads((d / layout.MODEL_META).read_text())
    assert Classifier.load(d).predict([str(shapes_root / "test" / "circle" / "circle_000.jpg")])[0] is not None  # still loads and predicts
    rc = main(["-q", "predict", str(d), str(shapes_root / "test"), "--neighbors", "3", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("imgclf: error:") and "no similar-cases index" in err[0]


@pytest.mark.parametrize("name", [layout.NEIGHBORS_TENSORS, layout.NEIGHBORS_META])
def test_a_tampered_index_file_is_refused(trained_run, shapes_root, tmp_path, capsys, name):
    d = _with_index(trained_run, tmp_path / "m")
    data = bytearray((d / name).read_bytes())
    data[-3] ^= 0x01
    (d / name).write_bytes(bytes(data))
    clf = Classifier.load(d)  # the model itself is intact
    with pytest.raises(BundleError, match="sha256 differs"):
        clf.neighbor_index()
    rc = main(["-q", "predict", str(d), str(shapes_root / "test"), "--neighbors", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "sha256 differs" in err[0] and name in err[0]
    (d / name).unlink()
    with pytest.raises(BundleError, match="missing"):
        Classifier.load(d).neighbor_index()


def test_resaving_a_loaded_model_keeps_its_index(trained_run, tmp_path):
    clf = Classifier.load(_with_index(trained_run, tmp_path / "m"))
    d = clf.save(tmp_path / "again")
    cases = json.loads((trained_run / layout.MODEL_META).read_text())["neighbors"]["count"]  # counted against split.csv above
    assert json.loads((d / layout.MODEL_META).read_text())["neighbors"]["count"] == cases
    assert len(Classifier.load(d).neighbor_index()) == cases


def test_the_report_shows_nearest_training_cases(trained_run, tmp_path):
    from imgclf.report.html import write_run_report

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    rows = list(csv.DictReader(io.StringIO((run / layout.TEST_PREDICTIONS).read_text())))
    # make the first test image a confident mistake, so the worst-mistakes section has one
    names = ["circle", "square", "triangle"]
    wrong = next(c for c in names if c != rows[0]["true"])
    for c in names:
        rows[0][c] = "0.98" if c == wrong else "0.01"
    rows[0]["predicted"] = wrong
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    (run / layout.TEST_PREDICTIONS).write_text(buf.getvalue())
    page = write_run_report(run, gradcam_images=0).read_text()
    section = page[page.index('id="nearest-cases"'):]
    assert "neighbour 5" in section and section.count('src="data:image/jpeg;base64,') >= 6  # the mistake + its 5 cases
    assert "http://" not in section and "https://" not in section


def test_after_stage_two_the_index_holds_the_tuned_backbones_features(shapes_root, tmp_path, monkeypatch):
    import imgclf.train.loops
    from imgclf.train.classifier import ImageClassifier

    monkeypatch.setattr(imgclf.train.loops, "better", lambda *a: True)  # stage 2's weights are kept
    clf = ImageClassifier(backbone="timm:test_efficientnet", weights="none", epochs=1, finetune_epochs=1, finetune_views=1, cache_dir=tmp_path / "c")
    clf.fit(shapes_root)
    assert clf._tuned
    index = clf.neighbor_index()
    paths = index.paths[:6]
    tuned, ok, _ = clf.features(paths)
    # the index took the tuned tail over stage 2's bf16-stored prefix activations: the whole tuned backbone's features up to that rounding
    err_tuned = np.abs(index.features[:6] - nb.normalise(tuned)).max()
    assert err_tuned < 1e-3, err_tuned
    frozen, _, _ = ImageClassifier(backbone="timm:test_efficientnet", weights="none", cache_dir=tmp_path / "c").features(paths)
    assert np.abs(nb.normalise(frozen) - index.features[:6]).max() > max(1e-3, 3 * err_tuned)  # not the pre-stage-2 features
    assert [c[0].path for c in clf.neighbors(paths, 1)] == paths
