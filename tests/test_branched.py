"""Several Lite backbones as one entry (``efficientnet_lite0+lite1``): the registry entry, the
network (each backbone at its own input size), heads that each read one backbone's features,
and a run through training, the bundle, loading, Grad-CAM and the ONNX export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import bundle_copy
from imgclf.backbones.modules import build_feature_extractor
from imgclf.backbones.specs import UnknownBackboneError, get_backbone_spec
from imgclf.backbones.weights import WeightsFileError, resolve_weights
from imgclf.cli.main import main
from imgclf.model.heads import build_head, head_config, head_from_config, head_members
from imgclf.train.heads import fit_head, fit_heads
from imgclf.train.loops import TrainConfig
from test_training import _blobs

PAIR = "efficientnet_lite0+lite1"


def test_entry_names_its_backbones_and_takes_the_largest_input():
    spec = get_backbone_spec(PAIR)
    lite0, lite1 = get_backbone_spec("efficientnet_lite0"), get_backbone_spec("efficientnet_lite1")
    assert spec.family == "branched" and [b.name for b in spec.branches] == [lite0.name, lite1.name]
    assert [b.preprocessing for b in spec.branches] == [lite0.preprocessing, lite1.preprocessing]
    # each member: its last four stages pooled (80 + 112 + 192 + 320 channels), not the conv head's 1280
    assert spec.feature_dim == 1408 and spec.feature_parts == (704, 704) and lite0.feature_parts == (1280,)
    assert spec.preprocessing == lite1.preprocessing  # 240 px: Lite0 is resized down inside the network
    assert get_backbone_spec("efficientnet_lite2+lite0").preprocessing.input_size == 260
    assert get_backbone_spec("efficientnet_lite0").describe() != spec.branches[0].describe()  # so their caches differ
    assert [b["name"] for b in spec.describe()["branches"]] == ["efficientnet_lite0", "efficientnet_lite1"]
    for bad in ("efficientnet_lite0+lite0", "efficientnet_lite0+b0", "efficientnet_lite0+lite1+lite2+lite1", "efficientnet_lite0+"):
        with pytest.raises(UnknownBackboneError, match="two or three different Lite backbones"):
            get_backbone_spec(bad)


def test_weights_are_its_backbones_own_and_a_single_file_is_refused(tmp_path):
    spec = get_backbone_spec(PAIR)
    ref = resolve_weights(spec, "imagenet")
    parts = [resolve_weights(b, "imagenet") for b in spec.branches]
    assert ref.identity == "+".join(p.identity for p in parts) and ref.kind == "package"
    f = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1)}, f)
    with pytest.raises(WeightsFileError, match="a weights file fits one backbone"):
        resolve_weights(spec, str(f))
    assert resolve_weights(spec, "none").kind == "none"


def _pooled_stage_outputs(name: str, x: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    """The plain Lite network run as it always is, the outputs of ``blocks`` caught by hooks, pooled."""
    plain = get_backbone_spec(name)
    fx = build_feature_extractor(plain, resolve_weights(plain, "imagenet"))
    caught = {}
    for i in blocks:
        fx.body.net._blocks[i].register_forward_hook(lambda m, a, out, i=i: caught.__setitem__(i, out))
    with torch.no_grad():
        fx(x)
    return torch.cat([caught[i].mean(dim=(2, 3)) for i in blocks], 1)


def entry_features(name: str, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module]:
    """(random 0..255 images, the registry entry's features of them, its extractor)."""
    spec = get_backbone_spec(name)
    fx = build_feature_extractor(spec, resolve_weights(spec, "imagenet"))
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255
    with torch.no_grad():
        return x, fx(x), fx


def test_features_are_each_backbone_s_last_four_stages_at_its_own_size_side_by_side():
    x, got, fx = entry_features(PAIR, 240, 0)
    # the last blocks of stages 4-7: Lite0 has 16 blocks, Lite1 21
    want0 = _pooled_stage_outputs("efficientnet_lite0", F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False), [7, 10, 14, 15])
    want1 = _pooled_stage_outputs("efficientnet_lite1", x, [10, 14, 19, 20])
    assert got.shape == (2, 1408)
    torch.testing.assert_close(got[:, :704], want0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[:, 704:], want1, atol=1e-4, rtol=1e-4)
    maps = fx.feature_map(x)  # every pooled map, for Grad-CAM
    assert [tuple(m.shape[1:]) for m in maps] == [(80, 14, 14), (112, 14, 14), (192, 7, 7), (320, 7, 7),
                                                  (80, 15, 15), (112, 15, 15), (192, 8, 8), (320, 8, 8)]


def test_declared_stage_widths_are_the_network_s():
    # specs.py declares the members' widths without torch; the networks built from the packages must agree
    for spec in get_backbone_spec("efficientnet_lite0+lite1+lite2").branches:
        fx = build_feature_extractor(spec, resolve_weights(spec, "none"))
        x = torch.zeros(1, 3, spec.preprocessing.input_size, spec.preprocessing.input_size)
        with torch.no_grad():
            maps, pooled = fx.feature_map(x), fx(x)
        assert len(maps) == 4 and sum(m.shape[1] for m in maps) == spec.feature_dim == pooled.shape[1], spec.name


def test_part_heads_read_only_their_backbone_s_features():
    torch.manual_seed(0)
    head = build_head("recipe", 12, 3, members=4, parts=(8, 4)).eval()
    assert head_members(head) == 4
    assert [(m.features.start, m.features.stop) for m in head.members] == [(0, 8), (0, 8), (8, 12), (8, 12)]
    x = torch.randn(5, 12)
    y = x.clone()
    y[:, 8:] += 3.0  # the second backbone's features change
    with torch.no_grad():
        for k, member in enumerate(head.members):
            same = torch.equal(member(x), member(y))
            assert same is (k < 2)
    cfg = head_config("recipe", 12, 3, members=4, parts=(8, 4))
    assert cfg["parts"] == [8, 4] and "parts" not in head_config("recipe", 12, 3, members=4, parts=(12,))
    again = head_from_config(cfg)
    again.load_state_dict(head.state_dict(), strict=True)
    torch.testing.assert_close(again.eval()(x), head(x))
    for parts, members in (((8, 5), 4), ((8, 4), 3), ((8, 4), 34)):
        with pytest.raises(ValueError, match="head"):
            build_head("recipe", 12, 3, members=members, parts=parts)


def test_fit_heads_trains_each_part_on_its_columns():
    x, y = _blobs(dim=16)
    cfg = TrainConfig(epochs=6, patience=0, seed=3)
    head, _, summary = fit_heads(x, y, x[::3], y[::3], 3, cfg, members=2, parts=(10, 6))
    assert head_members(head) == 4 and len(summary["members"]) == 4
    # member 2 is the seed-5 head trained on columns 10..16 alone
    alone, _, _ = fit_head(x[:, 10:], y, x[::3, 10:], y[::3], 3, TrainConfig(epochs=6, patience=0, seed=5))
    torch.testing.assert_close(head.members[2].state_dict()["fc2.weight"], alone.state_dict()["fc2.weight"])
    assert head.members[2].fc1.in_features == 6 and head.members[0].fc1.in_features == 10


@pytest.fixture(scope="module")
def pair_run(shapes_root, tmp_path_factory):
    project = tmp_path_factory.mktemp("pair")
    rc = main(["-q", "train", str(shapes_root), "--backbone", PAIR, "--heads", "2", "--epochs", "4", "--project", str(project),
               "--name", "p", "--no-progress", "--no-report", "--bootstrap", "0"])
    assert rc == 0
    return project / "p"


def test_run_trains_the_frozen_pair_and_says_why_stage_two_is_skipped(pair_run, tmp_path, caplog):
    from imgclf.train.classifier import ImageClassifier

    meta = json.loads((pair_run / "model.json").read_text())
    assert meta["backbone"]["name"] == PAIR and meta["head"]["parts"] == [704, 704] and meta["head"]["members"] == 4
    assert meta["format"] == "imgclf-bundle/5" and meta["frozen_backbone"] is True
    assert len(json.loads((pair_run / "config.json").read_text())["fit_summary"]["stages"]) == 1
    with caplog.at_level("WARNING", logger="imgclf"):
        assert ImageClassifier(recipe="finetune", backbone=PAIR, cache_dir=tmp_path).stage2_blocks() == 0
    assert "stage 2 fine-tunes the blocks of one backbone" in caplog.text and "stage 2 skipped" in caplog.text
    with pytest.raises(ValueError, match="drop unfreeze"):  # asked for explicitly: refused, not skipped
        ImageClassifier(backbone=PAIR, unfreeze=1, cache_dir=tmp_path).stage2_blocks()


def test_pair_loads_predicts_explains_and_exports(pair_run, shapes_root, tmp_path):
    from PIL import Image

    from imgclf.explain.gradcam import gradcam
    from imgclf.export.onnx import export_onnx
    from imgclf.model.classifier import Classifier
    from imgclf.predict.onnx_predictor import OnnxClassifier

    paths = sorted((shapes_root / "test").rglob("*.jpg"))[::4]
    clf = Classifier.load(pair_run, engine="torch", precision="fp32", use_cache=False)
    p = clf.predict_proba(paths)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)
    with Image.open(paths[0]) as im:
        heat, k, prob = gradcam(clf, im.convert("RGB"))
    assert heat.shape == (240, 240) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    assert prob == pytest.approx(float(p[0, k]), abs=1e-4)
    d = bundle_copy(pair_run, tmp_path / "m")
    res = export_onnx(d, d / "model.onnx")  # parity with PyTorch is checked inside; a mismatch raises
    np.testing.assert_allclose(OnnxClassifier(res.path).predict_proba(paths), p, atol=1e-4)


def test_a_weights_file_with_the_pair_is_a_one_line_error(shapes_root, tmp_path, capsys):
    f = tmp_path / "w.pth"
    torch.save({"x": torch.zeros(1)}, f)
    rc = main(["train", str(shapes_root), "--backbone", PAIR, "--weights", str(f), "--project", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "fits one backbone" in err and len(err.splitlines()) == 1


def test_a_pair_model_from_before_stage_features_is_refused_in_one_line(pair_run, shapes_root, tmp_path, capsys):
    # an imgclf-bundle/4 pair model: its heads read the members' conv-head features (1280 each)
    d = bundle_copy(pair_run, tmp_path / "old")
    meta = json.loads((d / "model.json").read_text())
    meta["format"], meta["head"]["parts"], meta["head"]["in_dim"] = "imgclf-bundle/4", [1280, 1280], 2560
    (d / "model.json").write_text(json.dumps(meta))
    rc = main(["predict", str(d), str(next((shapes_root / "test").rglob("*.jpg")))])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "width 1280+1280" in err and "704+704" in err and "retrain" in err, err
