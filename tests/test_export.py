"""ONNX export: one graph, metadata + sidecar, parity with PyTorch on real images, refusal of
tampered files, int8 with its accuracy change, and the predict engine choice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import bundle_copy
from imgclf.cli.main import main
from imgclf.data.augment import TTA_VIEWS
from imgclf.evaluation.thresholds import prediction_rows
from imgclf.export.graph import classifier_graph
from imgclf.export.metadata import Decision, ExportError, sidecar_path
from imgclf.export.onnx import ParityError, export_onnx
from imgclf.predict.base import ArrayPredictor, Predictor
from imgclf.predict.choose import predictor_for
from imgclf.predict.onnx_predictor import OnnxClassifier



@pytest.fixture(scope="module")
def test_paths(shapes_root) -> list[Path]:
    return sorted((shapes_root / "test").rglob("*.jpg"))


def test_export_writes_one_graph_with_metadata_and_sidecar(exported, capsys):
    import hashlib

    import onnx

    onnx_path = exported / "model.onnx"
    side = json.loads(sidecar_path(onnx_path).read_text())
    data = onnx_path.read_bytes()
    assert side["format"] == "imgclf-onnx/1"
    assert side["onnx_sha256"] == hashlib.sha256(data).hexdigest() and side["onnx_size"] == len(data)
    size = json.loads((exported / "model.json").read_text())["preprocessing"]["input_size"]  # 240: the default Lite0+Lite1 pair
    assert side["class_names"] == ["circle", "square", "triangle"] and side["input_size"] == size == 240
    assert side["preprocessing"]["mean"] == [127.0, 127.0, 127.0] and "centre-crop 240x240" in side["resize_policy"]
    assert side["threshold"] is None and side["decision"] == "argmax"
    p = side["parity"]
    assert p["n_images"] == 6 and p["source"] == "given images" and p["max_abs_diff"] <= 1e-4 and p["top1_agree"] == 6

    model = onnx.load_from_string(data)
    props = {kv.key: kv.value for kv in model.metadata_props}
    assert json.loads(props["imgclf.class_names"]) == side["class_names"]
    assert props["imgclf.input_size"] == "240" and json.loads(props["imgclf.threshold"]) is None
    assert json.loads(props["imgclf.preprocessing"])["interpolation"] == "bicubic"
    assert props == side["onnx_metadata"]
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 240, 240]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 3]
    # normalisation is inside the graph: the mean/std constants are there, applied to a Cast of the uint8 input
    assert any(n.op_type == "Cast" and n.input[0] == "image" for n in model.graph.node)
    assert any(n.op_type == "Softmax" for n in model.graph.node)


def test_onnx_matches_pytorch_on_real_images(exported, test_paths):
    from imgclf.model.classifier import Classifier
    from imgclf.export.graph import eager_proba
    from imgclf.export.images import decode_to_array

    onnx_clf = OnnxClassifier(exported)
    torch_clf = Classifier.load(exported, engine="torch", precision="fp32", use_cache=False)
    graph = classifier_graph(torch_clf)
    x = np.stack([decode_to_array(p, onnx_clf.preprocessing) for p in test_paths])
    ref = eager_proba(graph, x)
    got = onnx_clf.predict_proba_arrays(x)
    assert got.shape == (18, 3) and np.allclose(got.sum(1), 1, atol=1e-5)
    assert np.abs(got - ref).max() <= 1e-4
    assert (got.argmax(1) == ref.argmax(1)).all()
    # and it agrees with the model's own (cached-feature, maybe bf16) predictions
    default = Classifier.load(exported).predict_proba(test_paths)
    assert (default.argmax(1) == got.argmax(1)).all() and np.abs(default - got).max() < 0.05
    assert (got.argmax(1) == np.repeat([0, 1, 2], 6)).mean() >= 0.9


def test_arrays_nhwc_nchw_single_and_batch_agree(exported, test_paths):
    from imgclf.export.images import decode_to_array

    clf = OnnxClassifier(exported)
    x = np.stack([decode_to_array(p, clf.preprocessing) for p in test_paths[:4]])
    a = clf.predict_proba_arrays(x)
    b = clf.predict_proba_arrays(x.transpose(0, 2, 3, 1))
    c = np.concatenate([clf.predict_proba_arrays(x[i]) for i in range(4)])  # one CHW image at a time
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-5)
    assert clf.predict_proba_arrays(x[:0]).shape == (0, 3)
    with pytest.raises(ValueError, match="uint8"):
        clf.predict_proba_arrays(x.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        clf.predict_proba_arrays(x[:, :, :100, :100])


def test_predict_table_rows_match_image_classifier(exported, test_paths, tmp_path):
    from imgclf.model.classifier import Classifier

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths = [test_paths[0], bad, test_paths[7], tmp_path / "missing.png"]
    onnx_rows = OnnxClassifier(exported).predict_table(paths)
    torch_rows = Classifier.load(exported).predict_table(paths)
    assert [list(r) for r in onnx_rows] == [list(r) for r in torch_rows] == [["path", "predicted", "circle", "square", "triangle", "error"]] * 4
    for o, t in zip(onnx_rows, torch_rows):
        assert o["path"] == t["path"] and o["predicted"] == t["predicted"]
        assert (o["error"] is None) == (t["error"] is None)
        if o["error"] is None:
            assert abs(o["circle"] - t["circle"]) < 0.05
    assert onnx_rows[1]["predicted"] is None and "broken.jpg" in onnx_rows[1]["error"] and onnx_rows[1]["circle"] is None
    assert "missing.png" in onnx_rows[3]["error"]
    clf = OnnxClassifier(exported)
    assert clf.predict(paths) == [r["predicted"] for r in onnx_rows]
    assert isinstance(clf, Predictor) and isinstance(clf, ArrayPredictor)
    assert isinstance(Classifier.load(exported), Predictor)
    assert set(clf.errors_) == {str(bad), str(tmp_path / "missing.png")}


def test_tampered_onnx_is_refused(exported, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(exported, d)
    data = bytearray((d / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the weights
    (d / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sha256") as e:
        OnnxClassifier(d)
    assert "\n" not in str(e.value) and "re-export" in str(e.value)
    # predict's auto engine ignores it (warning) and falls back to the PyTorch path; onnx refuses
    from imgclf.model.classifier import Classifier

    assert isinstance(predictor_for(d, "auto"), Classifier)
    with pytest.raises(ExportError, match="sha256"):
        predictor_for(d, "onnx")


def test_tampered_or_missing_sidecar_is_refused(exported, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(exported, d)
    sc = d / "model.onnx.json"
    side = json.loads(sc.read_text())
    side["class_names"] = ["circle", "triangle", "square"]  # swapped labels: silently wrong answers
    sc.write_text(json.dumps(side))
    with pytest.raises(ExportError, match="class_names"):
        OnnxClassifier(d)
    side = json.loads((exported / "model.onnx.json").read_text())
    side["onnx_metadata"]["imgclf.threshold"] = json.dumps({"value": 0.1, "positive_class": "square"})
    sc.write_text(json.dumps(side))
    with pytest.raises(ExportError, match="disagrees"):
        OnnxClassifier(d)
    sc.write_text("{not json")
    with pytest.raises(ExportError, match="not valid JSON"):
        OnnxClassifier(d)
    sc.unlink()
    with pytest.raises(ExportError, match="missing"):
        OnnxClassifier(d)
    with pytest.raises(ExportError, match="no such ONNX"):
        OnnxClassifier(tmp_path / "nowhere.onnx")


def test_parity_failure_fails_loudly_and_writes_nothing(trained_run, exported, tmp_path, monkeypatch, capsys):
    import imgclf.export.onnx as ex

    d = bundle_copy(trained_run, tmp_path / "m")
    good = (exported / "model.onnx").read_bytes()
    monkeypatch.setattr(ex, "export_graph_bytes", lambda graph, size: good)  # skip the slow trace
    real = ex.eager_proba
    monkeypatch.setattr(ex, "eager_proba", lambda graph, arrays, batch_size=16: np.roll(real(graph, arrays), 1, axis=1))
    with pytest.raises(ParityError, match="top-1 identical 0/"):
        export_onnx(d, images=str(exported.parent / "parity-images"))
    assert not (d / "model.onnx").exists() and not (d / "model.onnx.json").exists()
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
    # through the CLI: one line, exit 1
    monkeypatch.setattr(ex, "eager_proba", lambda graph, arrays, batch_size=16: real(graph, arrays) + 1e-3)
    rc = main(["export", str(d), "--images", str(exported.parent / "parity-images")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("imgclf: error: parity check failed") and "max |ΔP| 0.001" in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (d / "model.onnx").exists()


def test_int8_is_separate_reported_and_never_silently_used(exported, capsys):
    side = json.loads((exported / "model.int8.onnx.json").read_text())
    q = side["quantization"]
    assert q["type"] == "int8-static-qdq" and q["calibration"]["n_images"] == 8 and q["calibration"]["source"].startswith("train split")
    t = q["test"]
    assert t["n_images"] == 18 and t["accuracy_fp32"] >= 0.9
    assert t["accuracy_change"] == pytest.approx(t["accuracy_int8"] - t["accuracy_fp32"])
    assert side["model_id"].endswith("-int8")
    clf8 = OnnxClassifier(exported / "model.int8.onnx")
    assert clf8.engine == "onnxruntime-int8" and clf8.quantization["test"]["accuracy_int8"] == t["accuracy_int8"]
    # the int8 file is smaller, and the default engine still picks the fp32 graph
    assert (exported / "model.int8.onnx").stat().st_size < 0.5 * (exported / "model.onnx").stat().st_size
    chosen = predictor_for(exported, "auto")
    assert isinstance(chosen, OnnxClassifier) and chosen.path.name == "model.onnx" and chosen.quantization is None


def test_predictor_for_exports_on_the_fly_and_detects_stale_exports(trained_run, test_paths, tmp_path):
    from imgclf.model.classifier import Classifier

    d = bundle_copy(trained_run, tmp_path / "m")
    assert isinstance(predictor_for(d, "auto"), Classifier)  # nothing exported: feature path
    assert isinstance(predictor_for(d, "torch"), Classifier)
    clf = predictor_for(d, "onnx")  # exports now, parity-checked on split.csv's images
    assert isinstance(clf, OnnxClassifier) and (d / "model.onnx").is_file()
    side = json.loads((d / "model.onnx.json").read_text())
    assert side["parity"]["n_images"] == 16 and side["parity"]["source"].startswith("test split")
    assert set(Path(p).parent.name for p in side["parity"]["images"]) == {"circle", "square", "triangle"}
    assert isinstance(predictor_for(d, "auto"), OnnxClassifier)
    assert isinstance(predictor_for(d / "model.onnx", "auto"), OnnxClassifier)
    with pytest.raises(ValueError, match="--engine"):
        predictor_for(d, "fastest")
    # the bundle changes (retrained in place): the export is stale and not used
    meta = json.loads((d / "model.json").read_text())
    meta["note"] = "retrained"
    (d / "model.json").write_text(json.dumps(meta))
    assert isinstance(predictor_for(d, "auto"), Classifier)
    rows = predictor_for(d, "auto").predict_table(test_paths[:1])
    assert rows[0]["predicted"] == "circle"
    # another --tta than the model's: exported (views in the graph) to the cache, not over model.onnx
    before = (d / "model.onnx").read_bytes()
    flips = predictor_for(d, "onnx", tta="flips")
    assert isinstance(flips, OnnxClassifier) and flips.model_id.endswith("-tta-flips") and flips.path.parent.name.endswith("-tta-flips")
    assert (d / "model.onnx").read_bytes() == before
    assert json.loads(flips.metadata["imgclf.tta"])["views_averaged_in_graph"] == ["identity", "hflip", "vflip", "rot180"]
    ref = Classifier.load(d, engine="torch", precision="fp32", use_cache=False, tta="flips").predict_proba(test_paths[::6])
    np.testing.assert_allclose(flips.predict_proba(test_paths[::6]), ref, atol=1e-4)
    assert predictor_for(d, "onnx", tta="flips").path == flips.path  # found again, not re-exported


def test_export_cli_errors_are_one_line(tmp_path, trained_run, capsys):
    d = bundle_copy(trained_run, tmp_path / "m")
    (d / "split.csv").write_text("split,class,path\ntest,circle,/nowhere/a.jpg\n")
    cases = [
        (["export", str(tmp_path / "nope")], "no model.json"),
        (["export", str(d)], "--images DIR"),
        (["export", str(d), "--out", str(tmp_path / "x.txt")], ".onnx"),
        (["export", str(d), "--images", str(tmp_path / "empty")], "no images"),
    ]
    (tmp_path / "empty").mkdir()
    for argv, needle in cases:
        rc = main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, argv
        assert len(err) >= 1 and err[-1].startswith("imgclf: error:") and needle in err[-1], (argv, err)
    assert main(["export", str(d), "--format", "tflite"]) == 2  # a bad flag: one line, exit 2, like any user error
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imgclf: error:") and "--format" in err[0], err


def test_decision_threshold_rules():
    d = Decision.from_meta({"class_names": ["benign", "malignant"], "threshold": 0.3, "positive_class": "malignant"})
    p = np.array([[0.75, 0.25], [0.65, 0.35], [0.2, 0.8]])
    assert d.indices(p).tolist() == [0, 1, 1] and d.description == "P(malignant) >= 0.3"
    assert d.to_dict() == {"value": 0.3, "positive_class": "malignant"}
    d2 = Decision.from_meta({"class_names": ["a", "b"], "threshold": {"value": 0.9, "positive_class": "a"}})
    assert d2.indices(p).tolist() == [1, 1, 1]
    assert Decision.from_meta({"class_names": ["a", "b", "c"], "threshold": 0.3}).threshold is None  # binary only
    assert Decision.from_meta({"class_names": ["a", "b"]}).indices(p).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="threshold"):
        Decision.from_meta({"class_names": ["a", "b"], "threshold": 1.5})
    rows = d.rows(["x.jpg", "y.jpg"], np.array([[0.65, 0.35], [np.nan, np.nan]]), {"y.jpg": "y.jpg: broken"})
    assert rows[0]["predicted"] == "malignant" and rows[1] == {"path": "y.jpg", "predicted": None, "benign": None, "malignant": None, "error": "y.jpg: broken"}
    # the same rows as the feature path's (one implementation): threshold on the second class
    assert rows == prediction_rows(["x.jpg", "y.jpg"], np.array([[0.65, 0.35], [np.nan, np.nan]]), {"y.jpg": "y.jpg: broken"}, ["benign", "malignant"], 0.3)
    assert d2.rows(["x.jpg"], p[:1], {})[0]["predicted"] == "b"


def test_test_time_views_in_the_graph_match_pil_and_export_to_onnx(tmp_path):
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    img[0, :3] = 255  # asymmetric
    pil = Image.fromarray(img)
    ops = {"hflip": Image.Transpose.FLIP_LEFT_RIGHT, "vflip": Image.Transpose.FLIP_TOP_BOTTOM, "rot90": Image.Transpose.ROTATE_90, "rot180": Image.Transpose.ROTATE_180, "rot270": Image.Transpose.ROTATE_270}
    x = torch.from_numpy(img.transpose(2, 0, 1).copy())[None]
    for name, op in ops.items():
        want = np.asarray(pil.transpose(op)).transpose(2, 0, 1)
        got = TTA_VIEWS[name].tensor_op(x)[0].numpy()
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert TTA_VIEWS[name].pil_op == op  # the feature path's view is the same one

    class Views(torch.nn.Module):
        def forward(self, x):
            return torch.cat([TTA_VIEWS[n].tensor_op(x) for n in ops], dim=1)

    path = tmp_path / "views.onnx"
    torch.onnx.export(Views(), (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"], opset_version=17)
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_array_equal(y, Views()(x).numpy())


def test_graph_with_tta_matches_image_classifier(trained_run, test_paths, tmp_path):
    from imgclf.model.classifier import Classifier
    from imgclf.export.graph import eager_proba
    from imgclf.export.images import decode_to_array

    d = bundle_copy(trained_run, tmp_path / "m")
    clf = Classifier.load(d, engine="torch", precision="fp32", use_cache=False, tta="flips")
    graph = classifier_graph(clf)
    assert graph.views == ("identity", "hflip", "vflip", "rot180")
    paths = test_paths[::6]
    x = np.stack([decode_to_array(p, clf.backbone_runner().spec.preprocessing) for p in paths])
    np.testing.assert_allclose(eager_proba(graph, x), clf.predict_proba(paths), atol=1e-4)


def test_predictor_for_honours_a_tta_override(exported, test_paths):
    from imgclf.model.classifier import Classifier

    # the export bakes the model's own views (none): a --tta override is not served by it
    auto = predictor_for(exported, "auto", tta="flips")
    assert isinstance(auto, Classifier) and auto.tta == "flips"
    assert isinstance(predictor_for(exported, "auto", tta="none"), OnnxClassifier)
    with pytest.raises(ValueError, match="tta"):
        predictor_for(exported / "model.onnx", "auto", tta="flips")


def test_engine_auto_measures_once_and_takes_the_feature_path_only_within_parity(trained_run, exported, test_paths, tmp_path, monkeypatch, caplog):
    import logging

    from imgclf.model.classifier import Classifier
    from imgclf.predict import choose

    d = bundle_copy(trained_run, tmp_path / "m", export_from=exported)
    assert isinstance(predictor_for(d, "onnx", cache_dir=tmp_path / "c"), OnnxClassifier)  # the export is found, up to date
    # the session's IMGCLF_AUTO_SWITCH_GAIN=inf: measured, stored, the export kept
    with caplog.at_level(logging.INFO, logger="imgclf"):
        assert isinstance(predictor_for(d, "auto", cache_dir=tmp_path / "c"), OnnxClassifier)
    stored = list((tmp_path / "c" / choose.ENGINE_CHOICE_DIR).glob("*.json"))
    assert len(stored) == 1
    choice = json.loads(stored[0].read_text())
    assert choice["engine"] == "onnx" and choice["images"] == 18 and choice["same_top_class"] and choice["max_abs_diff"] < 1e-3
    assert choice["onnx_img_s"] > 0 and choice["features_img_s"] > 0 and choice["feature_engine"] in ("onnxruntime fp32", "openvino bf16")
    assert "engine auto: ONNX Runtime" in caplog.text
    # any gain is enough: the feature path (fp32 here, within parity) is measured again under a new cache and taken
    monkeypatch.setenv("IMGCLF_AUTO_SWITCH_GAIN", "0")
    picked = predictor_for(d, "auto", cache_dir=tmp_path / "c2")
    assert isinstance(picked, Classifier) and picked.use_cache  # the measurement ran without the cache, the use with it
    np.testing.assert_allclose(picked.predict_proba(test_paths[:4]), OnnxClassifier(d / "model.onnx").predict_proba(test_paths[:4]), atol=1e-3)
    # the stored choice is read back, not measured again
    monkeypatch.setattr(choose, "measure_engines", lambda *a, **k: pytest.fail("measured twice"))
    assert isinstance(predictor_for(d, "auto", cache_dir=tmp_path / "c2"), Classifier)
    # outside parity: the export, whatever the speed
    monkeypatch.undo()
    monkeypatch.setenv("IMGCLF_AUTO_SWITCH_GAIN", "0")
    monkeypatch.setattr(choose, "AUTO_PARITY_ATOL", -1.0)
    out = choose.measure_engines(d, OnnxClassifier(d / "model.onnx"), lambda: Classifier.load(d))
    assert out["engine"] == "onnx" and "outside parity" in out["reason"]
