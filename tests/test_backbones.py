"""Registry entries carry their preprocessing; weights load from files, caches, or fail clearly."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from imgclf.backbones.modules import build_feature_extractor
from imgclf.backbones.specs import Preprocessing, UnknownBackboneError, available_backbones, get_backbone_spec
from imgclf.backbones.weights import WeightsUnavailableError, resolve_weights


def test_registry_entries_carry_their_preprocessing():
    lite = get_backbone_spec("efficientnet_lite0")
    assert lite.preprocessing == Preprocessing(224, 256, "bicubic", (127.0,) * 3, (128.0,) * 3, "center_crop")
    assert lite.feature_dim == 1280
    assert get_backbone_spec("efficientnet_lite1").preprocessing.input_size == 240
    assert get_backbone_spec("efficientnet_lite2").preprocessing.input_size == 260
    vgg = get_backbone_spec("vgg16")
    assert vgg.pooling == "max" and vgg.feature_dim == 512 and "block5_pool" in vgg.feature_point
    assert vgg.preprocessing.mean == pytest.approx((123.675, 116.28, 103.53))
    assert vgg.preprocessing.std == pytest.approx((58.395, 57.12, 57.375))
    assert (vgg.preprocessing.resize_size, vgg.preprocessing.input_size) == (256, 224)
    r50 = get_backbone_spec("resnet50")
    assert (r50.preprocessing.resize_size, r50.feature_dim) == (232, 2048)
    assert get_backbone_spec("efficientnet_b0").preprocessing.interpolation == "bicubic"
    assert get_backbone_spec("mobilenet_v3_large").feature_dim == 960
    assert get_backbone_spec("convnext_tiny").feature_dim == 768
    t = get_backbone_spec("timm:test_resnet")
    assert t.preprocessing.input_size == 160 and t.preprocessing.mean == pytest.approx((127.5,) * 3)
    assert "timm:<name>" in available_backbones()


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(UnknownBackboneError, match="unknown backbone 'vgg17'"):
        get_backbone_spec("vgg17")
    with pytest.raises(UnknownBackboneError, match="timm has no model"):
        get_backbone_spec("timm:no_such_model_xyz")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_from_a_local_file(tmp_path, suffix):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(1)
    net = torchvision.models.mobilenet_v3_large(weights=None)
    sd = net.state_dict()
    path = tmp_path / f"mnv3{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": sd}, path)  # a wrapped training checkpoint
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    spec = get_backbone_spec("mobilenet_v3_large")
    ref = resolve_weights(spec, str(path))
    assert ref.kind == "file" and ref.identity.startswith("sha256:")
    fx = build_feature_extractor(spec, ref)
    for k, v in fx.body.state_dict().items():
        assert torch.equal(v, sd[f"features.{k}"]), k
    assert not any(p.requires_grad for p in fx.parameters())
    out = fx(torch.zeros(2, 3, 224, 224, dtype=torch.uint8))
    assert out.shape == (2, 960)


def test_weights_file_with_pickled_objects_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    spec = get_backbone_spec("mobilenet_v3_large")
    with pytest.raises(ValueError, match="holds pickled objects, which imgclf never loads") as e:
        build_feature_extractor(spec, resolve_weights(spec, str(path)))
    assert "weights_only" not in str(e.value)  # never pass on advice to turn the safety off


@pytest.mark.parametrize("kind", ["random bytes", "pickled object", "wrong tensors", "bad safetensors"])
def test_a_bad_weights_file_is_one_line_before_any_work(tmp_path, capsys, kind):
    from imgclf.cli.main import main

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / ("w.safetensors" if kind == "bad safetensors" else "w.pth")
    if kind in ("random bytes", "bad safetensors"):
        path.write_bytes(bytes(range(256)) * 8)
    elif kind == "pickled object":
        torch.save({"x": Evil()}, path)
    else:
        torch.save({"x": torch.zeros(3)}, path)
    # the dataset does not even exist: the weights are checked first, and no run folder is made
    rc = main(["train", str(tmp_path / "no-data"), "--recipe", "fast", "--weights", str(path), "--project", str(tmp_path / "runs"), "--no-progress"])
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("imgclf: error:") and str(path) in err[0], err
    assert "weights_only" not in err[0] and "pwned" not in out.out + out.err and len(err[0]) < 400
    assert not (tmp_path / "runs").exists()


def test_weights_that_do_not_fit_are_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"features.0.0.weight": torch.zeros(3)}, path)
    spec = get_backbone_spec("mobilenet_v3_large")
    with pytest.raises(ValueError, match="weights do not fit this backbone"):
        build_feature_extractor(spec, resolve_weights(spec, str(path)))


def test_torch_hub_cache_is_used_before_any_download(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    spec = get_backbone_spec("mobilenet_v3_large")
    fname = spec.extra["url"].rsplit("/", 1)[-1]
    ckpt = tmp_path / "th" / "hub" / "checkpoints" / fname
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(2)
    sd = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    torch.save(sd, ckpt)
    ref = resolve_weights(spec, "imagenet")
    assert ref.kind == "hub-cache" and ref.path == str(ckpt) and ref.identity == f"torchvision:{fname}"
    fx = build_feature_extractor(spec, ref)
    assert torch.equal(fx.body.state_dict()["0.0.weight"], sd["features.0.0.weight"])


def test_offline_without_cache_names_file_cache_and_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    spec = get_backbone_spec("vgg16")
    with pytest.raises(WeightsUnavailableError) as e:
        resolve_weights(spec, "imagenet")
    msg = str(e.value)
    assert "\n" not in msg
    assert "vgg16-397923af.pth" in msg and str(tmp_path / "empty" / "hub" / "checkpoints") in msg
    assert "--weights PATH" in msg


def test_offline_error_from_cli_exits_2_with_one_line(tmp_path, monkeypatch, capsys, shapes_root):
    from imgclf.cli.main import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    rc = main(["train", str(shapes_root), "--backbone", "vgg16", "--project", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("imgclf: error: vgg16: ImageNet weights not available offline")


def test_timm_weights_from_local_file_and_offline_error(tmp_path):
    import timm

    torch.manual_seed(3)
    net = timm.create_model("test_resnet", pretrained=False)  # with its classifier, like a hub file
    path = tmp_path / "test_resnet.pth"
    torch.save(net.state_dict(), path)
    spec = get_backbone_spec("timm:test_resnet")
    fx = build_feature_extractor(spec, resolve_weights(spec, str(path)))
    assert fx(torch.zeros(1, 3, 160, 160, dtype=torch.uint8)).shape == (1, spec.feature_dim)
    assert torch.equal(fx.body.net.conv1[0].weight, net.conv1[0].weight)
    with pytest.raises(WeightsUnavailableError, match="Hugging Face cache"):
        resolve_weights(spec, "imagenet")


def test_embedded_lite0_weights_are_real_imagenet_weights():
    """A cat photo through our preprocessing + Lite0 features + the package's own classifier."""
    import torchvision
    from PIL import Image
    from skimage import data

    from imgclf.backbones.weights import read_state_dict
    from imgclf.data.preprocess import image_to_array

    spec = get_backbone_spec("efficientnet_lite0")
    ref = resolve_weights(spec, "imagenet")
    assert ref.kind == "package"
    fx = build_feature_extractor(spec, ref)
    sd = read_state_dict(ref.path)
    x = torch.from_numpy(image_to_array(Image.fromarray(data.chelsea()), spec.preprocessing))[None]
    with torch.no_grad():
        logits = fx(x) @ sd["_fc.weight"].T + sd["_fc.bias"]
    categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    top = categories[int(logits.argmax())]
    assert top in {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"}, top
    assert float(torch.softmax(logits, 1).max()) > 0.3
    coffee = torch.from_numpy(image_to_array(Image.fromarray(data.coffee()), spec.preprocessing))[None]
    with torch.no_grad():
        assert categories[int((fx(coffee) @ sd["_fc.weight"].T + sd["_fc.bias"]).argmax())] == "espresso"


def test_preprocessing_resize_and_crop_policies():
    from PIL import Image

    from imgclf.data.preprocess import image_to_array

    img = Image.new("RGB", (400, 200), (10, 20, 30))
    img.paste((250, 0, 0), (0, 0, 100, 200))  # left quarter red: cropped away by centre crop
    prep = Preprocessing(224, 256, "bilinear")
    arr = image_to_array(img, prep)
    assert arr.shape == (3, 224, 224) and arr.dtype == np.uint8
    assert arr[0].max() < 100  # red strip gone
    squash = image_to_array(img, Preprocessing(224, 224, "bilinear", policy="squash"))
    assert squash[0, :, 0].min() > 200  # squash keeps the whole width


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_other_lite_entries_load_their_packaged_weights(name):
    spec = get_backbone_spec(name)
    ref = resolve_weights(spec, "imagenet")
    assert ref.kind == "package" and name.replace("_", "-") in ref.identity
    fx = build_feature_extractor(spec, ref)
    s = spec.preprocessing.input_size
    assert fx(torch.zeros(1, 3, s, s, dtype=torch.uint8)).shape == (1, 1280)
