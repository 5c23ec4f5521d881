"""Heads trained side by side as one stack (imgclf.train.stacked): every member as if alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from imgclf.model.heads import build_head
from imgclf.train.heads import fit_head
from imgclf.train.loops import TrainConfig, class_weights, make_loss
from imgclf.train.stacked import HeadStack, _mean_losses, dropout_scale, fit_stacked, stackable


def _data(seed=0, n=90, d=12, k=3):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    x = rng.normal(size=(n, d)).astype(np.float32) + 0.8 * y[:, None].astype(np.float32)
    return x, y


@pytest.mark.parametrize("kind", ["recipe", "linear", "tutorial"])
def test_the_stack_computes_each_members_own_head(kind):
    heads = []
    for seed in range(3):
        torch.manual_seed(seed)
        head = build_head(kind, 12, 4)
        if hasattr(head, "norm"):
            head.norm.fit(torch.randn(50, 12) * (seed + 1))
        heads.append(head.eval())
    stack = HeadStack.of(heads)
    x = torch.randn(3, 7, 12)
    out = stack(x)
    for k, head in enumerate(heads):
        torch.testing.assert_close(out[k], head(x[k]))
        for name, value in stack.member_state(k).items():
            assert torch.equal(value, head.state_dict()[name]), name


@pytest.mark.parametrize("settings", [dict(class_weight="none"), dict(class_weight="balanced", label_smoothing=0.1),
                                      dict(loss="focal", focal_gamma=2.0, class_weight="none"), dict(loss="focal", class_weight="balanced")])
def test_each_members_loss_is_the_loss_it_would_train_with_alone(settings):
    cfg = TrainConfig(**settings)
    y_all = np.array([0] * 30 + [1] * 10 + [2] * 5)
    weights = class_weights(y_all, 3, cfg.class_weight)
    assert (weights is None) == (cfg.class_weight == "none")
    logits, y = torch.randn(4, 9, 3), torch.randint(0, 3, (4, 9))
    loss_fn = make_loss(cfg, weights)
    expected = torch.stack([loss_fn(logits[k], y[k]) for k in range(4)])
    torch.testing.assert_close(_mean_losses(logits, y, make_loss(cfg, weights, "none"), weights), expected)


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_dropout_draws_each_members_mask_from_its_own_generator(p):
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    scale = dropout_scale((64, 32), p, gens)
    assert scale.shape == (3, 64, 32)
    assert torch.unique(scale).tolist() == pytest.approx([0.0, 1 / (1 - p)])
    assert abs(float((scale > 0).float().mean()) - (1 - p)) < 0.02
    alone = dropout_scale((64, 32), p, [torch.Generator().manual_seed(2)])
    assert torch.equal(alone[0], scale[1])  # member 1's mask does not depend on the others
    assert not torch.equal(scale[0], scale[1])


def test_a_member_trains_the_same_in_any_stack_and_stops_on_its_own():
    x, y = _data()
    xv, yv = _data(1, n=45)
    base = TrainConfig(mixup=0.2, patience=2, lr=0.05, epochs=30)
    cfgs = [dataclasses.replace(base, seed=7), dataclasses.replace(base, seed=8, epochs=3, patience=0, checkpoint="last"),
            dataclasses.replace(base, seed=9)]
    together = fit_stacked(x, y, xv, yv, 3, cfgs, [None, (0, 6), None])
    assert together[1][2]["epochs_run"] == 3 and not together[1][2]["stopped_early"]
    assert together[0][2]["stopped_early"] and together[0][2]["epochs_run"] == together[0][2]["best_epoch"] + 2
    assert together[1][0].fc1.in_features == 6
    for k in (0, 2):
        alone = fit_head(x, y, xv, yv, 3, cfgs[k])
        assert [(r["epoch"], r["best"]) for r in alone[1]] == [(r["epoch"], r["best"]) for r in together[k][1]]
        assert [r["val_loss"] for r in alone[1]] == pytest.approx([r["val_loss"] for r in together[k][1]], rel=1e-5)
        assert {**alone[2], "best_monitor": 0} == {**together[k][2], "best_monitor": 0}
        for a, b in zip(alone[0].state_dict().values(), together[k][0].state_dict().values()):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="share their settings"):
        fit_stacked(x, y, xv, yv, 3, [base, dataclasses.replace(base, lr=0.1)], [None, None])


def test_what_the_stack_does_not_train_goes_to_the_epoch_loop():
    x, _ = _data()
    assert stackable(TrainConfig(), x)
    assert not stackable(TrainConfig(), np.stack([x, x]))  # several feature views
    assert not stackable(TrainConfig(schedule="cosine"), x)
    assert not stackable(TrainConfig(monitor="val_calibrated_loss"), x)


def test_members_on_equal_width_parts_share_a_stack_and_read_their_own_columns():
    x, y = _data(d=12)
    cfgs = [dataclasses.replace(TrainConfig(epochs=4, patience=0, mixup=0.2), seed=s) for s in (3, 4)]
    together = fit_stacked(x, y, x[::3], y[::3], 3, cfgs, [(6, 12), (0, 6)])
    for (lo, hi), c, (head, _, _) in zip([(6, 12), (0, 6)], cfgs, together):
        alone, _, _ = fit_head(x[:, lo:hi], y, x[::3, lo:hi], y[::3], 3, c)
        torch.testing.assert_close(head.state_dict()["fc2.weight"], alone.state_dict()["fc2.weight"])
