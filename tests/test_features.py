"""Features are computed once, cached, validated, and agree across engines/precisions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from imgclf.backbones.specs import get_backbone_spec
from imgclf.backbones.weights import resolve_weights
from imgclf.engines.cache import FeatureCache
from imgclf.engines.extract import extract_features
from imgclf.engines.runner import BackboneRunner
from imgclf.engines.runtimes import cpu_has_bf16


def _runner(tmp_path, engine="auto", precision="auto", backbone="efficientnet_lite0"):
    spec = get_backbone_spec(backbone)
    return BackboneRunner(spec, resolve_weights(spec, "imagenet" if backbone.startswith("efficientnet_lite") else "none"), tmp_path / "cache", engine=engine, precision=precision)


class CountingRunner(BackboneRunner):
    """Counts images that reach the backbone (and whether it was built at all)."""

    calls = 0
    built = 0

    def _make(self):
        engine = super()._make()
        type(self).built += 1
        inner = engine.__call__

        class Wrapped:
            name, precision = engine.name, engine.precision

            def __call__(s, batch):
                type(self).calls += len(batch)
                return inner(batch)

        return Wrapped()


@pytest.fixture()
def real_images(tmp_path):
    paths = []
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        p = tmp_path / "imgs" / f"{name}.jpg"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(getattr(data, name)()).convert("RGB").save(p, quality=92)
        paths.append(p)
    return paths


def test_second_extraction_does_no_backbone_work(tmp_path, real_images):
    spec = get_backbone_spec("timm:test_efficientnet")
    CountingRunner.calls = CountingRunner.built = 0
    r1 = CountingRunner(spec, resolve_weights(spec, "none"), tmp_path / "c", engine="torch", precision="fp32")
    first = extract_features(real_images, r1)
    assert CountingRunner.calls == 4 and first.computed == 4 and first.cached == 0
    r2 = CountingRunner(spec, resolve_weights(spec, "none"), tmp_path / "c", engine="torch", precision="fp32")
    second = extract_features(real_images, r2)
    assert CountingRunner.calls == 4 and CountingRunner.built == 1  # no new calls, no model built
    assert second.cached == 4 and second.engine == "cache"
    np.testing.assert_array_equal(first.features, second.features)
    # another image with the same bytes under another name is a hit too
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(real_images[0].read_bytes())
    third = extract_features([copy], r2)
    assert third.cached == 1 and CountingRunner.calls == 4


def test_corrupt_or_partial_cache_entries_are_recomputed(tmp_path, real_images):
    spec = get_backbone_spec("timm:test_efficientnet")
    CountingRunner.calls = 0
    runner = CountingRunner(spec, resolve_weights(spec, "none"), tmp_path / "c", engine="torch", precision="fp32")
    ref = extract_features(real_images, runner).features
    files = sorted((tmp_path / "c" / "features").rglob("*.f32"))
    assert len(files) == 4
    files[0].write_bytes(files[0].read_bytes()[:-7])  # partial write
    raw = bytearray(files[1].read_bytes())
    raw[-3] ^= 0xFF  # silent bit flip in the payload
    files[1].write_bytes(bytes(raw))
    files[2].write_bytes(b"")  # empty
    again = extract_features(real_images, CountingRunner(spec, resolve_weights(spec, "none"), tmp_path / "c", engine="torch", precision="fp32"))
    assert CountingRunner.calls == 4 + 3
    np.testing.assert_allclose(again.features, ref, rtol=1e-5, atol=1e-5)


def test_cache_rejects_wrong_dimension(tmp_path):
    c = FeatureCache(tmp_path, "k", 4)
    c.put("ab" * 10, np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(c.get("ab" * 10), np.arange(4, dtype=np.float32))
    assert FeatureCache(tmp_path, "k", 5).get("ab" * 10) is None
    with pytest.raises(ValueError):
        c.put("cd" * 10, np.zeros(3))


def test_bad_files_are_reported_not_raised(tmp_path, real_images):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(real_images[0].read_bytes()[:500])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    res = extract_features([real_images[0], bad, empty, tmp_path / "missing.jpg"], _runner(tmp_path, engine="torch", precision="fp32", backbone="timm:test_efficientnet"))
    assert res.ok_indices == [0]
    assert set(res.errors) == {1, 2, 3}
    assert all("\n" not in m for m in res.errors.values())


def test_engines_agree_in_fp32(tmp_path, real_images):
    torch_f = extract_features(real_images, _runner(tmp_path / "t", "torch", "fp32"), use_cache=False).features
    ort_f = extract_features(real_images, _runner(tmp_path / "o", "onnxruntime", "fp32"), use_cache=False).features
    ov_f = extract_features(real_images, _runner(tmp_path / "v", "openvino", "fp32"), use_cache=False).features
    np.testing.assert_allclose(ort_f, torch_f, atol=1e-3)
    np.testing.assert_allclose(ov_f, torch_f, atol=1e-3)


BF16_MIN_COSINE = 0.99  # per-image cosine similarity of bf16 vs fp32 features


@pytest.mark.skipif(not cpu_has_bf16(), reason="CPU has no native bf16")
@pytest.mark.parametrize("engine", ["openvino", "torch"])
def test_bf16_features_agree_with_fp32(tmp_path, real_images, engine):
    fp32 = extract_features(real_images, _runner(tmp_path / "a", "onnxruntime", "fp32"), use_cache=False)
    bf16 = extract_features(real_images, _runner(tmp_path / "b", engine, "bf16"), use_cache=False)
    assert bf16.precision == "bf16" and bf16.engine == engine
    a, b = fp32.features, bf16.features
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() >= BF16_MIN_COSINE, cos
    assert not np.array_equal(a, b)  # it really ran in lower precision
