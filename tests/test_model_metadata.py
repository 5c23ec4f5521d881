"""model.json as a typed ModelMeta: the same JSON written back, old files still load, and a
bad file is refused with one line that names the problem."""

from __future__ import annotations

import json

import pytest

from imgclf.backbones.specs import get_backbone_spec
from imgclf.model.metadata import BUNDLE_FORMAT, FIELD_ORDER, BundleError, ModelMeta, read_model_meta


_HEAD = {"kind": "linear", "in_dim": 1280, "n_classes": 3, "hidden": 512, "dropout": 0.5}


def _model_json(**changes) -> dict:
    """A model.json as training writes it (Lite0 entry, 3 classes, linear head)."""
    spec = get_backbone_spec("efficientnet_lite0")
    d = {
        "format": BUNDLE_FORMAT,
        "imgclf_version": "0.1.0",
        "backbone": spec.describe(),
        "weights": {"kind": "package", "identity": "lite0:abc", "path": "/x/lite0.pth", "description": "lite0"},
        "preprocessing": spec.preprocessing.to_dict(),
        "class_names": ["circle", "square", "triangle"],
        "head": dict(_HEAD),
        "frozen_backbone": False,
        "backbone_tuned": {"unfreeze": 2, "digest": "fe29", "tensors": 24},
        "recipe": "finetune",
        "settings": {"epochs": 3, "input_scaling": "entry"},
        "train_config": {"lr": 0.001},
        "threshold": None,
        "threshold_policy": None,
        "positive_class": None,
        "tta": "flips",
        "seed": 7,
        "tensors_sha256": "ab" * 32,
    }
    d.update(changes)
    return json.loads(json.dumps(d))  # what a reader gets back from the file


def test_to_dict_gives_back_exactly_the_json_read():
    d = _model_json()
    meta = ModelMeta.from_dict(d)
    assert tuple(meta.to_dict()) == FIELD_ORDER and list(d) == list(FIELD_ORDER)
    assert json.dumps(meta.to_dict(), indent=2) == json.dumps(d, indent=2)
    assert meta.backbone_name == "efficientnet_lite0" and meta.weights_identity == "lite0:abc"
    assert meta.class_names == ("circle", "square", "triangle") and meta.preprocessing == get_backbone_spec("efficientnet_lite0").preprocessing
    assert meta.tta == "flips" and meta.seed == 7 and meta.backbone_tuned["unfreeze"] == 2
    # a caller changing the dict it got does not change the model's metadata
    meta.to_dict()["settings"]["epochs"] = 99
    assert meta.settings["epochs"] == 3


def test_older_files_load_and_unknown_keys_are_kept():
    d = _model_json(note="retrained by hand", threshold=0.3, positive_class="square", class_names=["circle", "square"])
    d["head"]["n_classes"] = 2
    for key in ("imgclf_version", "frozen_backbone", "backbone_tuned", "recipe", "settings", "train_config", "threshold_policy", "tta", "seed"):
        del d[key]
    meta = ModelMeta.from_dict(d)
    assert (meta.tta, meta.seed, meta.recipe, meta.settings, meta.backbone_tuned) == ("none", 0, "fast", {}, None)
    assert meta.threshold == 0.3 and meta.positive_class == "square"
    out = meta.to_dict()
    assert out["note"] == "retrained by hand" and list(out)[-1] == "note"


@pytest.mark.parametrize("change, message", [
    ({"format": "other/1"}, "not an imgclf bundle"),
    ({"format": "imgclf-bundle/9"}, "format imgclf-bundle/9 is newer than this imgclf reads"),
    ({"head": None}, "head must be an object"),
    ({"class_names": "circle"}, "class_names must be a non-empty list"),
    ({"class_names": ["a", "a", "b"]}, "class_names has duplicates"),
    ({"class_names": ["a", "b"]}, "class_names lists 2 classes but its head has 3"),
    ({"backbone": {"arch": "x"}}, "backbone must be an object with a name"),
    ({"preprocessing": {"input_size": 224}}, "preprocessing is not valid"),
    ({"preprocessing": {**get_backbone_spec("efficientnet_lite0").preprocessing.to_dict(), "input_size": "224"}}, "preprocessing sizes"),
    ({"seed": "7"}, "seed must be an integer"),
    ({"threshold": "high"}, "threshold must be a number or an object"),
    ({"threshold": True}, "threshold must be a number or an object"),
    ({"settings": []}, "settings must be an object"),
    ({"tta": 3}, "tta must be"),
    # --heads: several heads averaged; a branched backbone's feature parts share them evenly
    *[({"head": {**_HEAD, "members": bad}}, "head members must be an integer from 2 to 16") for bad in ("3", 1, 99)],
    *[({"head": {**_HEAD, **bad}}, "head parts must be") for bad in ({"parts": [1279, 2], "members": 2}, {"parts": [1280], "members": 2},
                                                                     {"parts": [1279, 1]})],
    ({"head": {**_HEAD, "parts": [1279, 1], "members": 3}}, "head members must be an integer from 2 to 32 shared evenly by 2 parts"),
])
def test_bad_model_json_is_one_line_naming_the_problem(change, message):
    with pytest.raises(BundleError, match=message) as info:
        ModelMeta.from_dict(_model_json(**change), source="run/model.json")
    assert str(info.value).startswith("run/model.json: ") and "\n" not in str(info.value)


def test_missing_keys_and_unreadable_files(tmp_path):
    d = _model_json()
    del d["head"], d["weights"]
    with pytest.raises(BundleError, match="missing keys weights, head"):
        ModelMeta.from_dict(d)
    path = tmp_path / "model.json"
    path.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_model_meta(path)
    path.write_text(json.dumps(_model_json()))
    assert read_model_meta(path) == ModelMeta.from_dict(_model_json())


def test_bundle_round_trip_writes_the_same_model_json(tmp_path):
    from imgclf.model.bundle import load_bundle, save_bundle
    from imgclf.model.heads import head_from_config

    import dataclasses
    import hashlib

    meta = ModelMeta.from_dict(_model_json(backbone_tuned=None, frozen_backbone=True, tensors_sha256=None))
    (tmp_path / "a").mkdir()
    save_bundle(tmp_path / "a", head_from_config(meta.head), meta)
    loaded, head_tensors, backbone_tensors = load_bundle(tmp_path / "a")
    # saving records the tensors' sha256; everything else comes back as it was
    assert loaded.tensors_sha256 == hashlib.sha256((tmp_path / "a" / "model.safetensors").read_bytes()).hexdigest()
    assert isinstance(loaded, ModelMeta) and dataclasses.replace(loaded, tensors_sha256=None) == meta and head_tensors and not backbone_tensors
    (tmp_path / "b").mkdir()
    head = head_from_config(loaded.head)
    head.load_state_dict(head_tensors)
    save_bundle(tmp_path / "b", head, loaded)
    assert (tmp_path / "b" / "model.json").read_bytes() == (tmp_path / "a" / "model.json").read_bytes()
    assert json.loads((tmp_path / "a" / "model.json").read_text()) == loaded.to_dict()
