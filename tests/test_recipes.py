"""Recipes, fine-tuning, augmented views, thresholds and test-time augmentation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from imgclf.api import ImageClassifier
from imgclf.data.augment import AugmentedView, build_augment, tta_views
from imgclf.backbones.blocks import backbone_blocks
from imgclf.backbones.modules import build_feature_extractor
from imgclf.backbones.specs import get_backbone_spec
from imgclf.backbones.weights import resolve_weights
from imgclf.engines.extract import extract_features
from imgclf.engines.runner import BackboneRunner
from imgclf.config.recipes import make_settings
from imgclf.evaluation.thresholds import apply_threshold, choose_threshold, parse_policy
from imgclf.train.loops import TrainConfig


def test_recipes_are_defaults_that_flags_override():
    seed = make_settings("seed", epochs=None, lr=3e-4)
    assert seed.epochs == 5 and seed.lr == 3e-4 and seed.input_scaling == "x/255" and seed.checkpoint == "last"
    assert not make_settings("fast").stage2
    assert make_settings("finetune").augment == "light" and make_settings("finetune").finetune_epochs > 0
    with pytest.raises(ValueError, match="recipe"):
        make_settings("nope")


def test_seed_recipe_keeps_the_x255_bug_and_says_so(shapes_root, tmp_path, caplog):
    clf = ImageClassifier(recipe="seed", progress=False).fit(shapes_root)
    prep = clf.meta_.preprocessing
    assert tuple(prep.mean) == (0.0, 0.0, 0.0) and tuple(prep.std) == (255.0, 255.0, 255.0) and prep.policy == "squash"
    assert any("x/255" in r.getMessage() for r in caplog.records)
    assert any("sigmoid" in r.getMessage() for r in caplog.records) and clf.meta_.head["kind"] == "tutorial"
    assert len(clf.history_) == 5  # fixed 5 epochs, no early stopping
    clf.save(tmp_path / "m")
    again = ImageClassifier.load(tmp_path / "m")
    paths = sorted((shapes_root / "test").rglob("*.jpg"))[:4]
    np.testing.assert_allclose(again.predict_proba(paths), clf.predict_proba(paths), atol=1e-6)


def test_blocks_compose_to_the_body_for_every_torchvision_entry():
    for name in ("efficientnet_lite0", "vgg16", "resnet50", "efficientnet_b0", "mobilenet_v3_large", "convnext_tiny"):
        spec = get_backbone_spec(name)
        fx = build_feature_extractor(spec, resolve_weights(spec, "imagenet" if "lite" in name else "none"))
        x = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8) if "lite" not in name else torch.randint(0, 255, (1, 3, 224, 224), dtype=torch.uint8)
        with torch.no_grad():
            h = fx.normalize(x)
            for _, block in backbone_blocks(fx, spec):
                h = block(h)
            torch.testing.assert_close(h, fx.feature_map(x))


def test_finetune_changes_exactly_the_unfrozen_blocks_and_keeps_frozen_bn(shapes_root, tmp_path, caplog):
    # a 1-epoch head leaves room for stage 2 to lower the validation loss (else the frozen model is kept)
    clf = ImageClassifier(recipe="finetune", epochs=1, lr=1e-4, unfreeze=2, finetune_epochs=2, finetune_views=2, cache_dir=tmp_path / "c", progress=False)
    spec = get_backbone_spec("efficientnet_lite0")
    base = build_feature_extractor(spec, resolve_weights(spec)).state_dict()
    with caplog.at_level("INFO", logger="imgclf"):
        clf.fit(shapes_root)
    fx = clf.backbone_runner().torch_module()
    names = [n for n, _ in backbone_blocks(fx, spec)]
    tuned_keys = set(clf._tuned)
    changed = {k for k, v in fx.state_dict().items() if not torch.equal(v, base[k])}
    assert changed and changed <= tuned_keys
    # every tuned tensor lives in the last two blocks (stage7 and the conv head)
    assert names[-2:] == ["stage7", "head"]
    assert all(k.startswith(("body.net._blocks.15.", "body.net._conv_head", "body.net._bn1")) for k in tuned_keys), sorted(tuned_keys)[:5]
    # frozen BatchNorm statistics did not move
    for k in base:
        if "running_" in k and k not in tuned_keys:
            assert torch.equal(fx.state_dict()[k], base[k]), k
    # --finetune-bn frozen (default): the tail's BN statistics are kept, its scale/shift train
    assert not any("running_" in k for k in changed)
    assert any(k.endswith("_bn1.weight") or k.endswith("_bn1.bias") for k in changed)
    assert clf.meta_.backbone_tuned["unfreeze"] == 2 and clf.fit_summary_["stages"][1]["device"] == "cpu"
    # fp32 on the CPU trains the tail channels-last; the runner's blocks come back contiguous
    stage2 = clf.fit_summary_["stages"][1]
    assert stage2["channels_last"] == (stage2["precision"] == "fp32")
    assert all(t.is_contiguous() for t in fx.state_dict().values())
    # extraction left the plain view's prefix activations on disk: stage 2 read them, ran the prefix for the other view only
    n_plain = len(clf.dataset_.samples["train"]) + len(clf.dataset_.samples["validation"])
    assert stage2["prefix_views_from_cache"] == n_plain
    # the similar-cases index came from the tuned tail over those cached activations: the whole tuned backbone agrees
    n_train = len(clf.dataset_.samples["train"])
    assert f"{n_train} of {n_train} images from stage 2's cached prefix activations" in caplog.text
    index = clf.neighbors_
    whole, ok, _ = clf.features(index.paths)
    assert len(ok) == len(index.paths)
    cos = (whole / np.linalg.norm(whole, axis=1, keepdims=True) * index.features.astype(np.float32)).sum(1)
    assert cos.min() > 0.999, cos.min()
    # the bundle carries the tuned tensors and reproduces predictions
    clf.save(tmp_path / "m")
    paths = sorted((shapes_root / "test").rglob("*.jpg"))
    again = ImageClassifier.load(tmp_path / "m", cache_dir=tmp_path / "c2")
    a, b = clf.predict_proba(paths), again.predict_proba(paths)
    assert (a.argmax(1) == b.argmax(1)).all() and np.abs(a - b).max() < 0.05
    assert clf.score(shapes_root) >= 0.8


def test_augmented_views_differ_are_deterministic_and_cached(shapes_root, tmp_path):
    cfg = build_augment("strong")
    img = Image.open(next((shapes_root / "train" / "circle").glob("*.jpg"))).convert("RGB")
    v1, v1b, v2 = AugmentedView(cfg, 1, 0), AugmentedView(cfg, 1, 0), AugmentedView(cfg, 2, 0)
    a, b, c = (np.asarray(v(img, "abc")) for v in (v1, v1b, v2))
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    spec = get_backbone_spec("timm:test_efficientnet")
    runner = BackboneRunner(spec, resolve_weights(spec, "none"), tmp_path / "c", engine="torch", precision="fp32")
    paths = sorted((shapes_root / "train").rglob("*.jpg"))[:6]
    plain = extract_features(paths, runner).features
    view = extract_features(paths, runner, transform=v1)
    assert view.computed == 6 and not np.allclose(plain, view.features)
    again = extract_features(paths, runner, transform=AugmentedView(cfg, 1, 0))
    assert again.cached == 6 and again.computed == 0
    np.testing.assert_array_equal(again.features, view.features)
    with pytest.raises(ValueError, match="crop_scale must be > 0"):  # checked by its declaration, before any work
        make_settings(crop_scale=0.0)
    with pytest.raises(ValueError, match="color_jitter must be < 1"):
        ImageClassifier(color_jitter=1.0)


def test_threshold_policies_on_a_constructed_case():
    # negatives at 0.1..0.5, positives at 0.45..0.9
    y = np.array([0] * 5 + [1] * 5)
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.45, 0.6, 0.7, 0.8, 0.9])
    assert choose_threshold(y, p, "youden") == pytest.approx(0.6)  # TPR 0.8, FPR 0
    assert choose_threshold(y, p, "sensitivity:1.0") == pytest.approx(0.45)  # catch all positives
    assert choose_threshold(y, p, "fixed:0.3") == 0.3
    t = choose_threshold(y, p, "balanced")
    sens, spec = (p[y == 1] >= t).mean(), (p[y == 0] < t).mean()
    assert abs(sens - spec) <= 0.2
    assert apply_threshold(np.stack([1 - p, p], 1), 0.6).tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    for bad in ("youden:1", "sensitivity", "sensitivity:2", "fixed:x", "other"):
        with pytest.raises(ValueError):
            parse_policy(bad)


def test_binary_model_stores_and_uses_its_threshold(tmp_path):
    from conftest import make_shapes_dataset

    root = make_shapes_dataset(tmp_path / "bin", {"train": 10, "validation": 5, "test": 5}, classes=("circle", "square"))
    clf = ImageClassifier(threshold_policy="sensitivity:1.0", epochs=5, cache_dir=tmp_path / "c").fit(root)
    assert clf.meta_.threshold == clf.threshold_ and 0 <= clf.threshold_ <= 1
    clf.save(tmp_path / "m")
    loaded = ImageClassifier.load(tmp_path / "m", cache_dir=tmp_path / "c")
    assert loaded.threshold_ == clf.threshold_
    paths = sorted((root / "test").rglob("*.jpg"))
    proba = loaded.predict_proba(paths)
    expected = ["square" if p >= loaded.threshold_ else "circle" for p in proba[:, 1]]
    assert loaded.predict(paths) == expected
    # predict follows the stored threshold, not 0.5
    loaded.threshold_ = 1.0 + 1e-9
    assert set(loaded.predict(paths)) == {"circle"}
    loaded.threshold_ = 0.0
    assert set(loaded.predict(paths)) == {"square"}


def test_tta_is_deterministic_and_averages_views(trained_run, shapes_root):
    paths = sorted((shapes_root / "test").rglob("*.jpg"))
    clf = ImageClassifier.load(trained_run)
    plain = clf.predict_proba(paths, tta="none")
    t1 = clf.predict_proba(paths, tta="flips")
    t2 = ImageClassifier.load(trained_run, tta="flips").predict_proba(paths)
    np.testing.assert_array_equal(t1, t2)
    assert not np.allclose(t1, plain) and np.allclose(t1.sum(1), 1)
    assert [v.name if v else "identity" for v in tta_views("flips")] == ["identity", "hflip", "vflip", "rot180"]


def test_tta_auto_chooses_on_validation_and_the_threshold_follows_the_views(tmp_path, caplog, monkeypatch):
    from conftest import make_shapes_dataset
    from imgclf.data.augment import TTA_PRESETS

    caplog.set_level(logging.INFO, logger="imgclf")
    root = make_shapes_dataset(tmp_path / "bin", {"train": 10, "validation": 6, "test": 4}, classes=("circle", "square"))
    # refit off: the refit heads have seen the validation images, so their validation probabilities are not what chose the threshold
    clf = ImageClassifier(recipe="fast", tta="auto", epochs=5, refit=False, cache_dir=tmp_path / "c").fit(root)
    assert clf.tta in TTA_PRESETS and clf.meta_.tta == clf.tta == clf.fit_summary_["tta"]
    assert any(r.getMessage().startswith("tta auto: validation log loss none ") for r in caplog.records)
    # the threshold is chosen on what the model outputs: its views averaged, after the temperature
    val = clf.dataset_.samples["validation"]
    y_val = np.array([s.label for s in val])
    for model in (clf, ImageClassifier(recipe="fast", tta="flips", epochs=5, refit=False, cache_dir=tmp_path / "c").fit(root)):
        p = model.predict_proba([s.path for s in val])[:, 1]
        assert model.threshold_ == pytest.approx(choose_threshold(y_val, p, model.settings.threshold_policy), abs=1e-6)

    # the rule, on constructed validation logits (views in TTA_PRESETS["d4"] order): the fewest views within the margin of the best
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    signal = np.where(y == 1, 0.5, -0.5)[None, :, None] * np.array([-1.0, 1.0])

    def choose(logits):
        monkeypatch.setattr(clf, "_validation_logits", lambda *a: logits)
        name, chosen = clf._choose_tta([], [], np.zeros((len(y), 1)), y)
        assert chosen.shape == (len(TTA_PRESETS[name]), len(y), 2)
        return name

    same = np.repeat(signal + rng.normal(0, 1, (1, len(y), 2)), 8, axis=0)
    assert choose(same) == "none"  # views that add nothing cost nothing
    names = TTA_PRESETS["d4"]
    noisy = signal + rng.normal(0, 1, (len(names), len(y), 2))
    assert choose(noisy) == "d4"  # independent errors: every view pays
    flips = noisy.copy()
    flips[names.index("rot90")], flips[names.index("rot270")] = noisy[names.index("hflip")], noisy[names.index("vflip")]
    # the quarter turns repeat two flips: d4 weighs those twice, no better than flips; the cheaper is kept
    assert choose(flips) == "flips"


def test_finetune_flags_switch_stage_two_on_under_fast():
    s = make_settings("fast", unfreeze=2)
    assert s.unfreeze == 2 and s.finetune_epochs == make_settings("finetune").finetune_epochs and s.finetune_lr > 0
    assert s.augment == "none"  # only the stage-2 values step aside
    s = make_settings("fast", finetune_epochs=3)
    assert s.finetune_epochs == 3 and s.unfreeze is None  # the entry's default blocks
    assert make_settings("fast").finetune_epochs == 0


def test_tta_fallback_keeps_rows_normalised(trained_run, shapes_root, tmp_path, monkeypatch):
    """A view that fails to decode falls back to the plain view: rows still sum to 1."""
    import imgclf.data.augment as aug

    clf = ImageClassifier.load(trained_run, cache_dir=tmp_path / "c")
    paths = sorted((shapes_root / "test").rglob("*.jpg"))[:3]
    original = aug.FixedView.__call__

    failed = []

    def flaky(self, img, h):
        if self.name == "vflip":
            failed.append(h)
            raise OSError("simulated decode failure")
        return original(self, img, h)

    monkeypatch.setattr(aug.FixedView, "__call__", flaky)
    p = clf.predict_proba(paths, tta="flips")
    assert failed  # the fallback really ran
    assert np.allclose(p.sum(1), 1.0)


def test_tail_batchnorm_statistics_frozen_or_following_batches():
    from imgclf.train.finetune import TailModel

    def run(mode):
        torch.manual_seed(0)
        tail = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())]
        model = TailModel(tail, nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2), autocast_bf16=False, tail_bn=mode)
        model.train()
        bn = model.tail[0][1]
        before = bn.running_mean.clone()
        model(torch.randn(8, 3, 6, 6) + 3.0).sum().backward()
        return bn, before, model

    bn, before, model = run("frozen")
    assert not bn.training and torch.equal(bn.running_mean, before) and bn.weight.grad is not None
    assert model.head.training  # only BatchNorm stays in eval mode
    bn, before, _ = run("train")
    assert bn.training and not torch.equal(bn.running_mean, before)
    with pytest.raises(ValueError, match="finetune_bn"):
        TailModel([], nn.Identity(), nn.Identity(), False, "nope")


def test_default_recipe_is_the_frozen_lite_pair():
    from imgclf.config.recipes import DEFAULT_RECIPE
    from imgclf.config.settings import SettingError

    assert DEFAULT_RECIPE == "ensemble" and ImageClassifier().recipe == "ensemble"
    default = make_settings()
    assert (default.backbone, default.finetune_epochs, default.heads) == ("efficientnet_lite0+lite1", 0, 5)
    # the pair's heads train on mixed features; fast, seed and finetune keep the declared 0
    assert TrainConfig.stage1(default).mixup == 0.2 and TrainConfig.stage1(make_settings(mixup=0)).mixup == 0
    assert [make_settings(r).mixup for r in ("fast", "seed", "finetune")] == [0, 0, 0]
    finetune = make_settings("finetune")
    assert finetune.backbone == "efficientnet_lite0" and finetune.finetune_epochs > 0 and make_settings("fast").backbone == "efficientnet_lite0_stages"
    assert make_settings("seed").head == "tutorial" and make_settings("seed").backbone == "efficientnet_lite0" and make_settings().finetune_bn == "frozen"
    # stage 2 asked for under the default recipe: one line naming the way out, not a silent skip
    with pytest.raises(SettingError, match="stage 2 fine-tunes the last blocks of one backbone.*is several.*--recipe finetune"):
        make_settings(finetune_epochs=3)
    # under fast, asking for stage 2 brings the conv-head Lite0 that stage 2 fine-tunes
    asked = make_settings("fast", finetune_epochs=3)
    assert asked.backbone == "efficientnet_lite0" and asked.stage2
    assert not make_settings("fast", finetune_epochs=3, backbone="efficientnet_lite0_stages").stage2
    assert make_settings("fast", finetune_epochs=0).backbone == "efficientnet_lite0_stages"  # no stage 2 asked after all
    assert make_settings(finetune_epochs=3, backbone="efficientnet_lite0").finetune_epochs == 3
    # the pair named explicitly with stage 2 asked for: accepted, and no fit runs stage 2 on it
    assert not make_settings(finetune_epochs=3, backbone="efficientnet_lite0+lite1").stage2 and make_settings("finetune").stage2


def test_finetune_that_does_not_help_keeps_the_frozen_model(shapes_root, tmp_path):
    clf = ImageClassifier(recipe="finetune", unfreeze=1, finetune_epochs=1, finetune_lr=0.5, finetune_views=1, cache_dir=tmp_path / "c")
    clf.fit(shapes_root)  # a huge stage-2 learning rate can only hurt
    stage2 = clf.fit_summary_["stages"][1]
    assert stage2["kept_start"] and clf._tuned is None and clf.meta_.frozen_backbone is True


def test_finetune_with_cutmix_and_mixup_runs_end_to_end(shapes_root, tmp_path):
    assert make_settings("fast", finetune_cutmix=1.0).finetune_epochs > 0  # a --finetune-* flag turns stage 2 on
    clf = ImageClassifier(recipe="finetune", unfreeze=1, finetune_epochs=2, finetune_views=1, finetune_cutmix=1.0, mixup=0.2, cache_dir=tmp_path / "c")
    clf.fit(shapes_root)
    rows = [r for r in clf.history_ if r["stage"] == "finetune"]
    assert len(rows) == 2 and all(np.isfinite(r["train_loss"]) for r in rows)
    assert clf.finetune_config_["cutmix"] == 1.0 and clf.train_config.cutmix == 0.0  # stage 1 (pooled vectors) has no boxes
    with pytest.raises(ValueError, match="cutmix"):
        ImageClassifier(finetune_cutmix=-0.5)


def test_timm_blocks_are_mapped_and_checked():
    from imgclf.backbones.blocks import BlocksUnknownError, check_blocks_compose

    for name, last in (("timm:test_efficientnet", "head"), ("timm:test_resnet", "layer4"), ("timm:test_nfnet", "stages.3+final"), ("timm:test_convnext", "stages.3+final")):
        spec = get_backbone_spec(name)
        fx = build_feature_extractor(spec, resolve_weights(spec, "none"))
        blocks = backbone_blocks(fx, spec)  # raises unless they compose to forward_features
        assert blocks[-1][0] == last and len(blocks) >= 3
    import copy

    changed = copy.deepcopy(blocks[-1][1])
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    with pytest.raises(BlocksUnknownError, match="do not reproduce"):
        check_blocks_compose(fx, blocks[:-1] + [("changed", changed)], spec)  # not the body's own last block
    with pytest.raises(BlocksUnknownError, match="do not run in sequence"):
        check_blocks_compose(fx, blocks[1:], spec)  # the stem left out: shapes no longer fit


def test_timm_backbone_fine_tunes_its_last_block(shapes_root, tmp_path, monkeypatch):
    import imgclf.train.loops

    monkeypatch.setattr(imgclf.train.loops, "better", lambda *a: True)  # every stage-2 epoch counts as better: tuned weights kept
    clf = ImageClassifier(recipe="finetune", backbone="timm:test_efficientnet", weights="none", epochs=2, finetune_epochs=2, finetune_views=1,
                          cache_dir=tmp_path / "c")
    clf.fit(shapes_root)  # stage 2 on the last block (conv_head + bn2)
    stage2 = clf.fit_summary_["stages"][1]
    assert stage2["stage"] == "finetune" and stage2["trainable_blocks"] == ["head"]
    assert clf._tuned and all(k.startswith(("body.net.conv_head", "body.net.bn2")) for k in clf._tuned), sorted(clf._tuned or [])


def test_unmapped_timm_backbone_skips_stage_two_or_refuses_unfreeze(shapes_root, tmp_path, caplog, monkeypatch):
    import imgclf.backbones.blocks as bb

    def unknown(net, name):  # as for a timm layout that _timm_blocks does not know
        raise bb.BlocksUnknownError(f"{name}: its block structure is not mapped, so it cannot be fine-tuned")

    monkeypatch.setattr(bb, "_timm_blocks", unknown)
    clf = ImageClassifier(recipe="finetune", backbone="timm:test_resnet", weights="none", epochs=2, cache_dir=tmp_path / "c")
    clf.fit(shapes_root)
    assert [s["stage"] for s in clf.fit_summary_["stages"]] == ["head"]
    assert any("stage 2 skipped" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="not mapped"):
        ImageClassifier(backbone="timm:test_resnet", weights="none", unfreeze=1, cache_dir=tmp_path / "c").fit(shapes_root)


def test_tail_channels_last_round_trip_keeps_parameters_and_outputs():
    from imgclf.train.finetune import TailModel

    torch.manual_seed(0)
    tail = [nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())]
    model = TailModel(tail, nn.AdaptiveAvgPool2d(1), nn.Linear(4, 2), autocast_bf16=False).eval()
    conv = model.tail[0][0]
    weight = conv.weight
    x = torch.randn(2, 3, 6, 6)
    want = model(x)
    model.use_channels_last(True)
    assert conv.weight is weight and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert torch.allclose(model(x), want, atol=1e-5)
    model.use_channels_last(False)
    assert conv.weight is weight and weight.is_contiguous() and not model.channels_last


def test_channels_last_only_for_tails_with_spatial_convolutions():
    from imgclf.train.finetune import _has_spatial_conv

    assert _has_spatial_conv([nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.ReLU())])
    assert not _has_spatial_conv([nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8))])
    spec = get_backbone_spec("efficientnet_lite0")
    blocks = backbone_blocks(build_feature_extractor(spec, resolve_weights(spec, "none")), spec)
    assert _has_spatial_conv([b for _, b in blocks[-2:]]) and not _has_spatial_conv([blocks[-1][1]])  # stage7 + head; head alone


def test_prefix_then_suffix_features_equal_the_backbone_and_fill_the_prefix_cache(shapes_root, tmp_path):
    from imgclf.fileio import content_hash
    from imgclf.train.finetune import plain_view_extraction

    spec = get_backbone_spec("efficientnet_lite0")
    # fp32: in bf16 the split graph rounds at other points than the whole one (~1e-2 apart)
    runner = BackboneRunner(spec, resolve_weights(spec), tmp_path / "c", precision="fp32")
    paths = sorted((shapes_root / "train").rglob("*.jpg"))[:6]
    whole = extract_features(paths, runner, use_cache=False)
    make = plain_view_extraction(runner, 2, tmp_path / "c")
    split = extract_features(paths, runner, use_cache=True, engine_factory=make)
    assert split.computed == len(paths) and split.ok_indices == whole.ok_indices
    assert np.allclose(split.features, whole.features, atol=1e-4, rtol=1e-3)
    engine = make()
    assert engine is make()  # built once
    assert all(engine.cache.get(content_hash(p)) is not None for p in paths)
    # the features went to the runner's own feature cache: a second extraction reads them
    again = extract_features(paths, runner, use_cache=True)
    assert again.cached == len(paths) and np.array_equal(again.features, split.features)
    assert plain_view_extraction(runner, 0, tmp_path / "c") is None
