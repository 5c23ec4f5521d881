"""--heads K: several stage-1 heads on the same features, one head averaging their probabilities,
through training, the bundle, loading, the ONNX export and a checked model.json."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import bundle_copy
from imgclf.cli.main import main
from test_training import _blobs
from imgclf.model.heads import HeadMembers, build_head, head_config, head_from_config, head_members, with_temperature
from imgclf.train.heads import fit_head, fit_heads
from imgclf.train.loops import TrainConfig


def test_members_output_is_the_log_of_their_mean_probability():
    torch.manual_seed(0)
    head = build_head("recipe", 8, 3, members=3)
    head.eval()
    x = torch.randn(5, 8)
    members = list(head.members)
    expected = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
    out = head(x)
    torch.testing.assert_close(torch.softmax(out, 1), expected)  # softmax of the output = the average
    torch.testing.assert_close(out.exp().sum(1), torch.ones(5))  # already log-probabilities
    assert head_members(head) == 3 and head_members(build_head("recipe", 8, 3)) == 1
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in head.state_dict()} == {"members.0", "members.1", "members.2"}


def test_ensemble_config_round_trips_with_its_temperature():
    head = with_temperature(build_head("linear", 8, 2, members=2), 0.5)
    cfg = head_config("linear", 8, 2, temperature=0.5, members=2)
    assert cfg["members"] == 2 and "members" not in head_config("linear", 8, 2)  # single heads read as before
    again = head_from_config(cfg)
    again.load_state_dict(head.state_dict(), strict=True)
    x = torch.randn(4, 8)
    torch.testing.assert_close(again.eval()(x), head.eval()(x))
    for bad in (0, 17, 2.5, True):
        with pytest.raises(ValueError, match="head members must be an integer"):
            build_head("recipe", 8, 2, members=bad)


def test_fit_heads_trains_members_from_consecutive_seeds():
    x, y = _blobs()
    cfg = TrainConfig(epochs=8, patience=0, seed=3)
    single, _, _ = fit_head(x, y, x[::3], y[::3], 3, cfg)
    alone, _, summary1 = fit_heads(x, y, x[::3], y[::3], 3, cfg, members=1)
    assert isinstance(alone, torch.nn.Sequential) and not hasattr(alone, "members") and "members" not in summary1
    torch.testing.assert_close(alone.state_dict()["fc2.weight"], single.state_dict()["fc2.weight"])  # one member = fit_head

    seen = []
    head, history, summary = fit_heads(x, y, x[::3], y[::3], 3, cfg, members=3, on_epoch=seen.append)
    assert isinstance(head.members, HeadMembers) and len(head.members) == 3
    # member 0 is the seed-3 head itself; members 1 and 2 come from seeds 4 and 5
    torch.testing.assert_close(head.members[0].state_dict()["fc2.weight"], single.state_dict()["fc2.weight"])
    seed4, _, _ = fit_head(x, y, x[::3], y[::3], 3, TrainConfig(epochs=8, patience=0, seed=4))
    torch.testing.assert_close(head.members[1].state_dict()["fc2.weight"], seed4.state_dict()["fc2.weight"])
    assert not torch.equal(head.members[1].state_dict()["fc2.weight"], head.members[2].state_dict()["fc2.weight"])
    assert len(seen) == len(history) == 8  # the first member's epochs
    assert [m["epochs_run"] for m in summary["members"]] == [8, 8, 8]
    with torch.no_grad():
        log_p = head(torch.from_numpy(x[::3]))
    assert summary["members_val_loss"] == pytest.approx(float(-log_p[torch.arange(len(y[::3])), torch.from_numpy(y[::3])].mean()), rel=1e-5)


@pytest.fixture(scope="module")
def heads_run(shapes_root, tmp_path_factory):
    project = tmp_path_factory.mktemp("heads")
    rc = main(["-q", "train", str(shapes_root), "--recipe", "fast", "--heads", "3", "--epochs", "6", "--project", str(project), "--name", "h3",
               "--no-progress", "--no-report", "--bootstrap", "0"])
    assert rc == 0
    return project / "h3"


def test_cli_run_saves_loads_and_exports_the_averaged_heads(heads_run, shapes_root, tmp_path):
    from imgclf.export.onnx import export_onnx
    from imgclf.model.classifier import Classifier
    from imgclf.predict.onnx_predictor import OnnxClassifier

    meta = json.loads((heads_run / "model.json").read_text())
    assert meta["head"]["members"] == 3 and meta["settings"]["heads"] == 3
    assert meta["format"] == "imgclf-bundle/3"  # older readers are told they need a newer imgclf
    summary = json.loads((heads_run / "config.json").read_text())["fit_summary"]["stages"][0]
    assert len(summary["members"]) == 3 and math.isfinite(summary["members_val_loss"])
    assert not list(heads_run.glob("checkpoint-*.safetensors"))  # every member's checkpoint removed with the finished run
    paths = sorted((shapes_root / "test").rglob("*.jpg"))[::4]
    clf = Classifier.load(heads_run, engine="torch", precision="fp32", use_cache=False)
    assert head_members(clf.head_) == 3
    p = clf.predict_proba(paths)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    d = bundle_copy(heads_run, tmp_path / "m")
    res = export_onnx(d, d / "model.onnx")  # parity with PyTorch is checked inside; a mismatch raises
    np.testing.assert_allclose(OnnxClassifier(res.path).predict_proba(paths), p, atol=1e-4)


def test_gradcam_runs_through_the_averaged_heads(heads_run, shapes_root):
    from PIL import Image

    from imgclf.explain.gradcam import gradcam
    from imgclf.model.classifier import Classifier

    clf = Classifier.load(heads_run, engine="torch", precision="fp32", use_cache=False)
    path = sorted((shapes_root / "test").rglob("*.jpg"))[0]
    with Image.open(path) as im:
        heat, k, prob = gradcam(clf, im.convert("RGB"))
    assert heat.ndim == 2 and heat.min() >= 0 and heat.max() == pytest.approx(1.0) and np.isfinite(heat).all()
    assert clf.class_names_[k] == clf.predict([path])[0]
    assert prob == pytest.approx(float(clf.predict_proba([path])[0, k]), abs=1e-4)


def test_heads_out_of_range_is_a_one_line_error(shapes_root, tmp_path, capsys):
    for bad in ("0", "17"):
        rc = main(["train", str(shapes_root), "--heads", bad, "--project", str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and "heads" in err and len(err.splitlines()) == 1 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("losses, heads_kept", [((0.1, 0.2), True), ((0.3, 0.2), False)])
def test_stage_two_replaces_the_frozen_heads_only_when_it_beats_them(shapes_root, tmp_path, monkeypatch, losses, heads_kept):
    """Stage 2 tunes the tail with the first head; the calibrated validation losses (frozen heads
    first, tuned second) decide which model is delivered, with the backbone that goes with it."""
    from imgclf.model.classifier import Classifier
    from imgclf.train import classifier as train_classifier
    from imgclf.train.classifier import ImageClassifier
    from imgclf.train.finetune import split_blocks, tail_state_keys

    given = iter(losses)
    monkeypatch.setattr(train_classifier, "calibrated_nll", lambda probs, y: (next(given), 1.0))
    real_finetune = train_classifier.finetune

    def stage2_always_tunes(runner, head, *args, unfreeze, **kwargs):
        """The real stage 2; when it keeps its start on this tiny set, its tail (weights scaled by 1.05,
        so that the tuned backbone differs from the pretrained one) is returned as tuned anyway, and
        the comparison with the frozen heads is always reached."""
        tuned, history, summary = real_finetune(runner, head, *args, unfreeze=unfreeze, **kwargs)
        if not tuned:
            fx = runner.torch_module()
            sd = fx.state_dict()
            tuned = {k: sd[k].detach().clone() * (1.05 if sd[k].is_floating_point() and k.endswith("weight") else 1)
                     for k in tail_state_keys(fx, split_blocks(fx, runner.spec, unfreeze)[1])}
            summary = {**summary, "kept_start": False}
        return tuned, history, summary

    monkeypatch.setattr(train_classifier, "finetune", stage2_always_tunes)
    clf = ImageClassifier(recipe="finetune", heads=2, epochs=4, finetune_epochs=2, finetune_patience=0, seed=0, cache_dir=tmp_path / "cache", neighbors=False)
    clf.fit(shapes_root)
    stage2 = clf.fit_summary_["stages"][1]
    assert stage2["frozen_heads"]["kept"] is heads_kept and next(given, None) is None
    assert head_members(clf.head_) == (2 if heads_kept else 1)
    assert (clf._tuned is None) is heads_kept and clf.meta_.frozen_backbone is heads_kept
    assert stage2["kept_start"] is False  # stage 2 did beat its own start; the frozen heads beat it in turn
    delivered = clf.fit_summary_["stages"][0 if heads_kept else 1]
    assert (clf.fit_summary_["best_epoch"], clf.fit_summary_["monitor"]) == (delivered["best_epoch"], delivered["monitor"])
    clf.save(tmp_path / "m")
    again = Classifier.load(tmp_path / "m", use_cache=False)
    paths = sorted((shapes_root / "test").rglob("*.jpg"))[::5]
    np.testing.assert_allclose(again.predict_proba(paths), clf.predict_proba(paths), atol=1e-5)


def test_an_images_probabilities_do_not_depend_on_its_batch():
    """The same features give the same probabilities, bit for bit, whatever else shares the
    batch and wherever the row sits in it (torchrun's shards must write what one process
    writes); and a head changed in place is used at once, not a stale copy."""
    from imgclf.model.classifier import Classifier

    torch.manual_seed(0)
    clf = Classifier(backbone="efficientnet_lite0", weights="none")
    clf.head_ = build_head("recipe", 704, 3, members=10, parts=(352, 352), temperature=True).eval()
    clf.class_names_ = ["a", "b", "c"]
    x = np.random.default_rng(0).normal(size=(61, 704)).astype(np.float32) * 3
    whole = clf._proba_from_features(x)
    for rows in (np.arange(1, 61, 2), np.arange(5, 17), [40, 3, 59], [60]):
        assert np.array_equal(clf._proba_from_features(x[rows]), whole[rows])
    assert np.allclose(whole.sum(1), 1, atol=1e-6) and whole.dtype == np.float64
    with torch.no_grad():
        next(clf.head_.parameters()).mul_(-2.0)  # in place
    changed = clf._proba_from_features(x)
    assert not np.array_equal(changed, whole)
    clf.head_ = build_head("recipe", 704, 3, members=10, parts=(352, 352), temperature=True).eval()  # another head
    assert not np.array_equal(clf._proba_from_features(x), changed)
