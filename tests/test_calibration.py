"""Post-hoc temperature scaling: the fit, its robustness, and that it travels with the model."""

import json

import numpy as np
import pytest

from imgclf.evaluation.calibration import T_MIN, apply_temperature, fit_temperature
from imgclf.evaluation.metrics import calibration_bins


def _overconfident(n=2000, seed=0):
    """Logits 3x too sharp: the true temperature is 3."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4)) * 1.5
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(4, p=row) for row in p])
    return z * 3.0, y


def test_recovers_the_temperature_and_lowers_ece():
    z, y = _overconfident()
    t = fit_temperature(z, y)
    assert 2.6 < t < 3.4
    before = calibration_bins(y, apply_temperature(z, 1.0))["ece"]
    after = calibration_bins(y, apply_temperature(z, t))["ece"]
    assert after < before / 2


def test_perfectly_separated_validation_does_not_send_t_to_the_floor():
    y = np.repeat(np.arange(3), 10)
    z = np.eye(3)[y] * 4.0  # every row right, margin 4
    t = fit_temperature(z, y)
    assert t > 0.2 and t > 5 * T_MIN  # maximum likelihood alone would hit the floor
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0


def test_argmax_unchanged():
    z, y = _overconfident(200)
    assert (apply_temperature(z, 0.3).argmax(1) == z.argmax(1)).all()


@pytest.mark.parametrize("calibration", ["temperature", "none"])
def test_model_stores_and_applies_its_temperature(tmp_path, shapes_root, calibration):
    from imgclf.model.classifier import Classifier
    from imgclf.train.classifier import ImageClassifier

    # one head: the format rule for a single head (several heads are imgclf-bundle/3, test_heads_ensemble)
    clf = ImageClassifier(recipe="fast", epochs=3, heads=1, calibration=calibration, neighbors=False, cache_dir=tmp_path / "cache").fit(shapes_root)
    paths = [s.path for s in clf.dataset_.samples["test"]]
    p = clf.predict_proba(paths)
    clf.save(tmp_path / "m")
    written = json.loads((tmp_path / "m" / "model.json").read_text())
    head = written["head"]
    # a calibrated head needs a reader that knows its temperature tensor; an uncalibrated bundle stays readable by all
    assert written["format"] == ("imgclf-bundle/2" if calibration == "temperature" else "imgclf-bundle/1")
    loaded = Classifier.load(tmp_path / "m", cache_dir=tmp_path / "cache")
    np.testing.assert_allclose(loaded.predict_proba(paths), p, atol=1e-6)
    if calibration == "none":
        assert "temperature" not in head and clf.temperature_ is None and loaded.temperature_ is None
    else:
        assert head["temperature"] == pytest.approx(clf.temperature_, rel=1e-5) and loaded.temperature_ == pytest.approx(clf.temperature_)
        assert clf.fit_summary_["temperature"] == clf.temperature_


def test_fit_on_raw_logits_is_not_biased_by_saturated_probabilities():
    """A confident mistake with a logit lead of 130: float32 log-probabilities clip at about -104."""
    z, y = _overconfident(200, seed=1)
    z = z.copy()
    z[0] = 0.0
    z[0, (y[0] + 1) % 4] = 130.0
    t_raw = fit_temperature(z, y)
    saturated = np.log(np.clip(apply_temperature(z, 1.0).astype(np.float32).astype(np.float64), 1e-300, None))  # what fitting on probabilities did
    assert abs(fit_temperature(saturated, y) - t_raw) > 0.5  # why the model fits on logits
    assert t_raw == pytest.approx(fit_temperature(z - z.max(1, keepdims=True), y), rel=1e-4)  # shift-invariant


def test_views_are_calibrated_as_their_average():
    z, y = _overconfident(600, seed=2)
    rng = np.random.default_rng(3)
    views = np.stack([z + rng.normal(scale=2.0, size=z.shape) for _ in range(4)])
    t_avg = fit_temperature(views, y)
    assert t_avg != pytest.approx(fit_temperature(views[0], y), rel=0.02)
    # the fitted T minimises the NLL of the averaged probabilities (prior aside, a local check)
    rows = np.arange(len(y))
    nll = lambda t: -np.log(apply_temperature(views, t)[rows, y]).mean()  # noqa: E731
    assert nll(t_avg) <= min(nll(t_avg * 0.9), nll(t_avg * 1.1))
