"""Recipe head, loss, class weights, early stopping, seeded determinism, metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from imgclf.model.heads import build_head
from imgclf.evaluation.metrics import classification_metrics
from imgclf.train.heads import fit_head
from imgclf.train.loops import TrainConfig, class_weights


def _blobs(n_per_class=30, dim=16, n_classes=3, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(n_classes, dim))
    x = np.concatenate([c + rng.normal(0, spread, size=(n_per_class, dim)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(n_classes), n_per_class)
    return x, y


def test_recipe_head_is_the_recipe_without_its_sigmoid():
    head = build_head("recipe", 1280, 2)
    kinds = [type(m) for m in head.children()]
    assert kinds[1:] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features) == (1280, 512, 2)
    assert head.dropout.p == 0.5
    assert not any(isinstance(m, nn.Sigmoid | nn.Softmax) for m in head.modules())  # logits out
    lin = build_head("linear", 64, 5)
    assert lin.fc.in_features == 64 and lin.fc.out_features == 5
    with pytest.raises(ValueError):
        build_head("mlp", 4, 2)


def test_tutorial_head_reproduces_sigmoid_with_keras_categorical_crossentropy():
    torch.manual_seed(0)
    head = build_head("tutorial", 8, 3).eval()
    assert not hasattr(head, "norm") and [type(m) for m in head.children()][-1] is nn.LogSigmoid
    x, y = torch.randn(5, 8), torch.tensor([0, 1, 2, 1, 0])
    z = head.fc2(head.relu(head.fc1(x)))  # the Dense N outputs before the sigmoid
    s = torch.sigmoid(z)
    keras_p = s / s.sum(1, keepdim=True)  # what categorical_crossentropy does with non-softmax outputs
    torch.testing.assert_close(torch.softmax(head(x), 1), keras_p)
    torch.testing.assert_close(nn.functional.cross_entropy(head(x), y), -keras_p[torch.arange(5), y].log().mean())


def test_monitor_val_accuracy_ranks_accuracy_then_loss():
    from imgclf.train.loops import better

    assert better((0.30, 1.0), (0.01, 0.99), "val_accuracy")  # more accurate wins despite a higher loss
    assert not better((0.30, 1.0), (0.01, 0.99), "val_loss")
    assert better((0.05, 1.0), (0.10, 1.0), "val_accuracy") and not better((0.10, 1.0), (0.05, 1.0), "val_accuracy")
    assert better((0.05, float("nan")), (0.10, float("nan")), "val_accuracy")  # no accuracy: loss decides
    with pytest.raises(ValueError, match="monitor"):
        TrainConfig(monitor="f1").validate()


def test_calibrated_loss_ignores_confidence_scale_but_not_ranking():
    from imgclf.train.loops import calibrated_nll

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, size=(200, 4))
    y = np.where(rng.random(200) < 0.8, z.argmax(1), rng.integers(0, 4, 200))  # mostly right, some noise

    def probs(logits):
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    plain = -np.log(probs(z)[np.arange(200), y]).mean()
    cal, t = calibrated_nll(probs(z), y)
    assert cal <= plain + 1e-9 and 0.03 <= t <= 30
    # an over-confident copy (x3) and an under-confident one (/3) of the same ranking score the same
    for k in (3.0, 1 / 3):
        cal_k, t_k = calibrated_nll(probs(k * z), y)
        assert abs(cal_k - cal) < 1e-4 and abs(t_k / k - t) / t < 1e-2
    shuffled = calibrated_nll(probs(rng.permutation(z)), y)[0]  # worse ranking: worse score
    assert shuffled > cal + 0.2
    assert np.isnan(calibrated_nll(np.zeros((0, 4)), np.zeros(0, int))[0])


def test_binary_uses_softmax_cross_entropy_and_learns():
    x, y = _blobs(n_classes=2)
    head, hist, summary = fit_head(x, y, x[::3], y[::3], 2, TrainConfig(epochs=15, patience=0))
    assert head.fc2.out_features == 2  # two logits, softmax CE (not one sigmoid unit)
    with torch.no_grad():
        p = torch.softmax(head(torch.from_numpy(x)), 1).numpy()
    assert np.allclose(p.sum(1), 1)
    assert (p.argmax(1) == y).mean() > 0.95


def test_same_seed_same_result_other_seed_differs():
    x, y = _blobs(spread=3.0)
    xv, yv = _blobs(seed=1, spread=3.0)
    cfg = TrainConfig(epochs=6, patience=0, seed=7)
    h1, hist1, _ = fit_head(x, y, xv, yv, 3, cfg)
    h2, hist2, _ = fit_head(x, y, xv, yv, 3, cfg)
    assert hist1 == hist2
    for (k, a), b in zip(h1.state_dict().items(), h2.state_dict().values()):
        assert torch.equal(a, b), k
    _, hist3, _ = fit_head(x, y, xv, yv, 3, TrainConfig(epochs=6, patience=0, seed=8))
    assert hist3 != hist1


def test_early_stopping_and_best_checkpoint():
    x, y = _blobs(n_per_class=10, spread=4.0)
    xv, yv = _blobs(n_per_class=10, seed=5, spread=4.0)
    head, hist, summary = fit_head(x, y, xv, yv, 3, TrainConfig(epochs=200, patience=3, lr=1e-2))
    assert summary["stopped_early"] and len(hist) < 200
    assert len(hist) - summary["best_epoch"] == 3
    best = min(h["val_loss"] for h in hist)
    assert hist[summary["best_epoch"] - 1]["val_loss"] == best
    loss = nn.CrossEntropyLoss()(head(torch.from_numpy(xv)), torch.from_numpy(yv)).item()
    assert loss == pytest.approx(best, rel=1e-5)  # the returned head is the best one


def test_class_weights_auto_rule():
    balanced = np.array([0] * 10 + [1] * 14)
    assert class_weights(balanced, 2, "auto") is None  # 1.4x: no weights
    skewed = np.array([0] * 10 + [1] * 30)
    w = class_weights(skewed, 2, "auto")
    assert w.tolist() == pytest.approx([2.0, 2 / 3])
    assert class_weights(skewed, 2, "none") is None
    assert class_weights(balanced, 2, "balanced") is not None


def test_invalid_config_is_rejected():
    for bad in (dict(epochs=0), dict(lr=-1.0), dict(batch_size=0), dict(class_weight="x")):
        with pytest.raises(ValueError):
            TrainConfig(**bad).validate()


def test_metrics_against_hand_computed_case():
    y = np.array([0, 0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.8, 0.9, 0.3])  # predicted: 0,0,1,1,0
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(y, probs, ["benign", "malignant"])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["per_class"]["malignant"]["recall"] == pytest.approx(1 / 2)
    assert m["per_class"]["benign"]["recall"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["per_class"]["malignant"]["precision"] == pytest.approx(1 / 2)
    assert m["confusion_matrix"]["counts"] == [[2, 1], [1, 1]]
    # ROC-AUC: positive scores {0.9,0.3} vs negative {0.1,0.4,0.8}: pairs won 3+1=4 of 6
    assert m["roc_auc"] == pytest.approx(4 / 6)
    assert m["positive_class"] == "malignant"


def test_cutmix_pastes_one_box_and_mixes_labels_by_its_area():
    from imgclf.train.loops import cutmix_batch

    x = torch.arange(4, dtype=torch.float32)[:, None, None, None].expand(4, 2, 10, 10).contiguous()  # image i is all i
    perm = torch.tensor([1, 2, 3, 0])
    out, lam = cutmix_batch(x, perm, 0.64, np.random.default_rng(3))
    for i in range(4):
        pasted = out[i] == x[perm[i]]
        kept = out[i] == x[i]
        assert (pasted | kept).all() and pasted.any() and kept.any()
        assert abs(pasted[0].float().mean().item() - (1 - lam)) < 1e-6  # lam = share of the original left
    assert 0 < lam < 1 and torch.equal(out, cutmix_batch(x, perm, 0.64, np.random.default_rng(3))[0])
    same, lam1 = cutmix_batch(x, perm, 1.0, np.random.default_rng(0))  # lam 1: nothing pasted
    assert lam1 == 1.0 and torch.equal(same, x)


def test_cutmix_trains_spatial_inputs_and_leaves_vectors_alone():
    from imgclf.train.loops import make_optimizer, train_one_epoch

    torch.manual_seed(0)
    cfg = TrainConfig(cutmix=1.0, batch_size=8)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
    x, y = torch.randn(16, 2, 6, 6), torch.arange(16) % 2
    gen = torch.Generator().manual_seed(0)
    before = [p.clone() for p in model.parameters()]
    loss, acc = train_one_epoch(model, [(x[:8], y[:8]), (x[8:], y[8:])], make_optimizer([{"params": list(model.parameters())}], cfg), nn.CrossEntropyLoss(), cfg, gen)
    assert np.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # 2-D features (stage 1): CutMix does not apply, so the epoch equals one without it
    lin = lambda: (torch.manual_seed(1), nn.Linear(4, 2))[1]  # noqa: E731
    xv, yv = torch.randn(8, 4), torch.arange(8) % 2
    runs = []
    for c in (TrainConfig(cutmix=1.0), TrainConfig()):
        m = lin()
        train_one_epoch(m, [(xv, yv)], make_optimizer([{"params": list(m.parameters())}], c), nn.CrossEntropyLoss(), c, torch.Generator().manual_seed(0))
        runs.append(m.weight.detach().clone())
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(ValueError, match="cutmix"):
        TrainConfig(cutmix=-1).validate()
