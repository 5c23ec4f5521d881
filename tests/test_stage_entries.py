"""One Lite backbone pooling its last four stages' outputs (``efficientnet_lite0_stages``, the
``fast`` recipe's): the registry entry, its features against the plain network, stage 2
refused, and a ``fast`` run through training, loading, Grad-CAM and the ONNX export."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import bundle_copy
from imgclf.backbones.specs import get_backbone_spec
from imgclf.backbones.weights import resolve_weights
from imgclf.cli.main import main
from imgclf.config.names import BACKBONE_NAMES, LITE_NAMES
from imgclf.model.classifier import Classifier
from imgclf.api import ImageClassifier
from test_branched import _pooled_stage_outputs, entry_features

STAGES = "efficientnet_lite0_stages"


def test_entry_is_lite0_with_its_weights_and_preprocessing_but_other_features():
    spec, plain = get_backbone_spec(STAGES), get_backbone_spec("efficientnet_lite0")
    assert STAGES in BACKBONE_NAMES and all(f"{n}_stages" in BACKBONE_NAMES for n in LITE_NAMES)
    assert spec.name == STAGES and spec.arch == plain.arch and spec.preprocessing == plain.preprocessing
    assert spec.feature_dim == 80 + 112 + 192 + 320 and spec.feature_parts == (704,) and plain.feature_dim == 1280
    assert resolve_weights(spec, "imagenet").identity == resolve_weights(plain, "imagenet").identity
    keys = {Classifier(n).backbone_runner().cache_key() for n in ("efficientnet_lite0", STAGES)}
    assert len(keys) == 2  # their features are cached apart
    assert get_backbone_spec("efficientnet_lite2_stages").feature_dim == 88 + 120 + 208 + 352


def test_features_are_the_plain_network_s_last_four_stage_outputs_pooled():
    x, got, _ = entry_features(STAGES, 224, 1)
    torch.testing.assert_close(got, _pooled_stage_outputs("efficientnet_lite0", x, [7, 10, 14, 15]), atol=1e-4, rtol=1e-4)


def test_stage_two_is_refused_when_asked_and_skipped_with_a_warning_otherwise(caplog):
    with pytest.raises(ValueError, match="stage outputs.*conv-head entry \\(efficientnet_lite0\\).*drop unfreeze"):
        ImageClassifier(backbone=STAGES, unfreeze=1).stage2_blocks()
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        assert ImageClassifier(recipe="finetune", backbone=STAGES).stage2_blocks() == 0
    assert "stage 2 skipped" in caplog.text


def test_fast_run_trains_loads_explains_and_exports(shapes_root, tmp_path):
    project = tmp_path / "runs"
    rc = main(["-q", "train", str(shapes_root), "--recipe", "fast", "--epochs", "4", "--bootstrap", "0", "--no-report",
               "--project", str(project), "--name", "fast", "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    run = project / "fast"
    meta = json.loads((run / "model.json").read_text())
    assert meta["backbone"]["name"] == STAGES and meta["head"]["in_dim"] == 704
    from PIL import Image

    from imgclf.explain.gradcam import gradcam

    clf = ImageClassifier.load(run)
    image = Image.open(next((shapes_root / "test" / "circle").iterdir())).convert("RGB")
    heat, _, prob = gradcam(clf, image)
    assert heat.shape == (224, 224) and float(heat.max()) > 0 and 0 < prob <= 1
    model = bundle_copy(run, tmp_path / "model")
    assert main(["-q", "export", str(model), "--images", str(shapes_root / "test")]) == 0  # parity checked inside
    assert (model / "model.onnx").is_file()
