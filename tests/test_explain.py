"""Grad-CAM: the heat sits on the object that carries the class, for every conv backbone;
non-convolutional backbones are refused clearly."""

from __future__ import annotations


import numpy as np
import pytest
from PIL import Image, ImageDraw

from imgclf.api import ImageClassifier
from imgclf.cli.main import main
from imgclf.explain.gradcam import explain_files, gradcam, model_input_image, overlay
from imgclf.model.heads import build_head

CLASSES = ("disc", "square")


def corner_image(cls: str, quadrant: int, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """Grey cloudy background; the only class signal is a coloured disc or square in one quadrant."""
    base = rng.normal(0, 1, (size // 8, size // 8, 1)) * np.ones(3) + 0.15 * rng.normal(0, 1, (size // 8, size // 8, 3))
    bg = Image.fromarray(np.clip(128 + 40 * base, 0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(bg, dtype=np.float32) + rng.normal(0, 8, (size, size, 1))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    qx, qy = quadrant % 2, quadrant // 2
    cx = int(size * (0.27 + 0.46 * qx + rng.uniform(-0.04, 0.04)))
    cy = int(size * (0.27 + 0.46 * qy + rng.uniform(-0.04, 0.04)))
    r = int(size * rng.uniform(0.10, 0.14))
    if cls == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(230, 60, 40))
    else:
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=(40, 80, 230))
    return img


def quadrant_share(heat: np.ndarray, quadrant: int) -> float:
    h, w = heat.shape
    q = heat[(quadrant // 2) * h // 2:(quadrant // 2 + 1) * h // 2, (quadrant % 2) * w // 2:(quadrant % 2 + 1) * w // 2]
    return float(q.sum() / heat.sum())


@pytest.fixture(scope="module")
def corner_model(tmp_path_factory):
    """Lite0 (ImageNet) + head trained on objects placed in random quadrants."""
    root = tmp_path_factory.mktemp("corners")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("validation", 4), ("test", 4)):
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                corner_image(c, i % 4, rng).save(d / f"{c}_{i}_q{i % 4}.png")
    # one head (--heads 1): the heat checks below need every toy test image predicted right, which
    # is how this 8-images-per-class set was set up; Grad-CAM through several heads: test_heads_ensemble
    clf = ImageClassifier(recipe="fast", epochs=15, seed=0, heads=1).fit(root)
    model_dir = tmp_path_factory.mktemp("corner-model")
    clf.save(model_dir)
    return clf, root, model_dir


def test_heat_sits_on_the_object(corner_model):
    clf, root, _ = corner_model
    tests = sorted((root / "test").rglob("*.png"))
    predicted = clf.predict(tests)
    shares = []
    for p, pred in zip(tests, predicted):
        with Image.open(p) as im:
            img = im.convert("RGB")
        heat, k, prob = gradcam(clf, img)
        assert heat.shape == (224, 224) and heat.dtype == np.float32
        assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
        assert clf.class_names_[k] == pred == p.parent.name
        assert 0.5 < prob <= 1.0
        share = quadrant_share(heat, int(p.stem[-1]))
        shares.append(share)
        assert share > 0.45, (p.name, share)  # uniform heat would give 0.25
    assert np.mean(shares) > 0.6, shares


def test_class_override_and_overlay(corner_model):
    clf, root, _ = corner_model
    p = sorted((root / "test" / "disc").glob("*.png"))[0]
    img = Image.open(p).convert("RGB")
    heat_pred, k_pred, p_pred = gradcam(clf, img)
    heat_other, k_other, p_other = gradcam(clf, img, class_name="square")
    assert clf.class_names_[k_pred] == "disc" and clf.class_names_[k_other] == "square"
    assert p_pred + p_other == pytest.approx(1.0, abs=1e-6)
    assert not np.allclose(heat_pred, heat_other)
    crop = model_input_image(clf, img)
    assert crop.size == (224, 224)
    ov = overlay(crop, heat_pred)
    assert ov.size == (224, 224) and ov.mode == "RGB"
    a, b = np.asarray(ov, np.float32), np.asarray(crop, np.float32)
    hot = heat_pred > 0.8
    # jet turns hot regions red-ish and cold ones blue-ish
    assert (a[..., 0] - b[..., 0])[hot].mean() > (a[..., 0] - b[..., 0])[heat_pred < 0.1].mean()
    assert (a[..., 2] - b[..., 2])[heat_pred < 0.1].mean() > (a[..., 2] - b[..., 2])[hot].mean()
    with pytest.raises(ValueError, match="not a class of this model"):
        gradcam(clf, img, class_name="triangle")


def test_explain_files_and_cli(corner_model, tmp_path, capsys):
    clf, root, model_dir = corner_model
    a = sorted((root / "test" / "disc").glob("*.png"))[0]
    other = tmp_path / "elsewhere"
    other.mkdir()
    twin = other / a.name  # same file name, other folder: must not overwrite
    twin.write_bytes(a.read_bytes())
    broken = other / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    out = tmp_path / "out"
    written = explain_files(clf, [a, twin, broken], out)
    assert [w.name for w in written] == [f"{a.stem}_gradcam_disc.png", f"{a.stem}_gradcam_disc-2.png"]
    for w in written:
        with Image.open(w) as im:
            assert im.size == (224, 224) and np.asarray(im).std() > 10
    with pytest.raises(ValueError, match="no image could be explained"):
        explain_files(clf, [broken], out)

    rc = main(["-q", "explain", str(model_dir), str(root / "test" / "square"), "--out", str(tmp_path / "cli"), "--class", "disc"])
    assert rc == 0
    files = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert len(files) == 4 and all(f.endswith("_gradcam_disc.png") for f in files)
    capsys.readouterr()
    rc = main(["-q", "explain", str(model_dir), str(a), "--out", str(tmp_path / "cli"), "--class", "nope"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "not a class of this model" in err


def _untrained(backbone: str) -> ImageClassifier:
    clf = ImageClassifier(backbone=backbone, weights="none", recipe="fast", seed=0)
    spec = clf.backbone_runner().spec
    clf.head_ = build_head("linear", spec.feature_dim, 2).eval()
    clf.class_names_ = ["a", "b"]
    return clf


def test_other_conv_backbones_work():
    rng = np.random.default_rng(1)
    img = corner_image("disc", 0, rng)
    for name in ("timm:test_efficientnet", "timm:test_resnet"):
        clf = _untrained(name)
        heat, k, prob = gradcam(clf, img)
        size = clf.backbone_runner().spec.preprocessing.input_size
        assert heat.shape == (size, size) and 0 <= heat.min() and heat.max() == pytest.approx(1.0) and heat.std() > 0
        assert 0 < prob < 1


def test_non_convolutional_backbone_is_refused():
    clf = _untrained("timm:test_vit")
    img = corner_image("disc", 0, np.random.default_rng(2))
    with pytest.raises(ValueError, match="Grad-CAM needs a convolutional feature map"):
        gradcam(clf, img)


def test_unfitted_model_is_refused():
    with pytest.raises(ValueError, match="trained model"):
        gradcam(ImageClassifier(recipe="fast"), Image.new("RGB", (32, 32)))
