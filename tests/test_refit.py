"""refit: once validation has chosen the frozen heads' epochs, temperature and threshold, the
heads train again on train + validation for those epochs and are the model."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from conftest import make_shapes_dataset
from imgclf.train import classifier as train_classifier
from imgclf.train.classifier import ImageClassifier
from imgclf.train.heads import fit_head, fit_heads
from imgclf.train.loops import TrainConfig
from test_training import _blobs


def test_member_epochs_train_each_head_exactly_that_long_without_validation():
    x, y = _blobs()
    cfg = TrainConfig(epochs=30, patience=5, seed=3)  # what validation would have stopped: overridden per member
    head, _, summary = fit_heads(x, y, x[:0], y[:0], 3, cfg, members=2, member_epochs=[4, 7])
    assert [m["epochs_run"] for m in summary["members"]] == [4, 7]
    alone, _, _ = fit_head(x, y, x[:0], y[:0], 3, TrainConfig(epochs=4, patience=0, checkpoint="last", seed=3))
    torch.testing.assert_close(head.members[0].state_dict()["fc2.weight"], alone.state_dict()["fc2.weight"])
    for bad in ([4], [4, 0]):
        with pytest.raises(ValueError, match="member_epochs"):
            fit_heads(x, y, x[:0], y[:0], 3, cfg, members=2, member_epochs=bad)


@pytest.fixture(scope="module")
def fits(shapes_root, tmp_path_factory):
    """The same fast fit with and without refit, and the fit_heads calls each made."""
    cache = tmp_path_factory.mktemp("refit-cache")
    out = {}
    for refit in (True, False):
        calls = []

        def spy(x, y, xv, yv, *args, **kwargs):
            calls.append({"n": len(y), "n_val": len(yv), "member_epochs": kwargs.get("member_epochs")})
            return real(x, y, xv, yv, *args, **kwargs)

        real = train_classifier.fit_heads
        train_classifier.fit_heads = spy
        try:
            clf = ImageClassifier(recipe="fast", heads=2, epochs=6, seed=0, refit=refit, cache_dir=cache, neighbors_thumbnail=0).fit(shapes_root)
        finally:
            train_classifier.fit_heads = real
        out[refit] = clf, calls
    return out


def test_refit_trains_the_validated_epochs_on_train_and_validation_and_keeps_the_decisions(fits, shapes_root, tmp_path):
    from imgclf.model.classifier import Classifier
    from imgclf.model.heads import head_temperature

    (refit, calls), (plain, plain_calls) = fits[True], fits[False]
    n_train, n_val = len(refit.dataset_.samples["train"]), len(refit.dataset_.samples["validation"])
    chosen = [m["best_epoch"] for m in plain.fit_summary_["stages"][0]["members"]]
    assert plain_calls == [{"n": n_train, "n_val": n_val, "member_epochs": None}] and plain.fit_summary_["refit"] is None
    assert calls == [{"n": n_train, "n_val": n_val, "member_epochs": None}, {"n": n_train + n_val, "n_val": 0, "member_epochs": chosen}]
    summary = refit.fit_summary_["refit"]
    assert (summary["images"], summary["validation_images"], summary["member_epochs"]) == (n_train + n_val, n_val, chosen)
    # validation decided with the first heads, the same in both fits; the refit heads carry the same temperature
    assert refit.temperature_ == plain.temperature_ and head_temperature(refit.head_) == pytest.approx(plain.temperature_)
    assert not torch.equal(refit.head_.members[0].state_dict()["fc2.weight"], plain.head_.members[0].state_dict()["fc2.weight"])
    # the similar cases are the images the delivered heads learned from
    def case_paths(clf, *splits):
        return sorted(str(s.path) for split in splits for s in clf.dataset_.samples[split])
    assert sorted(refit.neighbors_.paths) == case_paths(refit, "train", "validation") and refit.neighbors_.training_images == n_train + n_val
    assert sorted(plain.neighbors_.paths) == case_paths(plain, "train") and plain.neighbors_.training_images == n_train
    refit.save(tmp_path / "m")
    paths = sorted((shapes_root / "test").rglob("*.jpg"))[::4]
    np.testing.assert_allclose(Classifier.load(tmp_path / "m", use_cache=False).predict_proba(paths), refit.predict_proba(paths), atol=1e-5)


def test_refit_is_skipped_without_validation_images_and_off_in_the_seed_recipe(tmp_path, caplog):
    flat = make_shapes_dataset(tmp_path / "flat", {"": 6}, size=64)
    with caplog.at_level(logging.INFO, logger="imgclf"):
        clf = ImageClassifier(recipe="fast", heads=1, epochs=2, val_fraction=0.0, test_fraction=0.3, seed=0, cache_dir=tmp_path / "c",
                              neighbors=False).fit(flat)
    assert clf.fit_summary_["refit"] is None and "refit skipped: no validation images" in caplog.text
    seed = ImageClassifier(recipe="seed", cache_dir=tmp_path / "c", neighbors=False)
    assert seed.settings.refit is False
