"""The heads on cached features: ``fit_head`` (one) and ``fit_heads`` (several, averaged; with
``member_epochs`` their refit), trained side by side by :mod:`imgclf.train.stacked` where its
settings allow, else one at a time by :func:`imgclf.train.loops.fit_loop`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from imgclf.model.heads import build_head, ensemble_head, on_slice, part_bounds
from imgclf.train.checkpoint import EpochCheckpoint
from imgclf.train.loops import TrainConfig, fit_loop, seed_everything
from imgclf.train.stacked import feature_columns, fit_stacked, stackable

log = logging.getLogger("imgclf")


def fit_head(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    cfg: TrainConfig,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint: EpochCheckpoint | None = None,
) -> tuple[nn.Sequential, list[dict], dict]:
    """Train a head on cached features; ``x_train`` is (n, D) or (views, n, D).

    ``checkpoint``: saved after every epoch and resumed from (see :func:`~imgclf.train.loops.fit_loop`).
    Where :func:`~imgclf.train.stacked.stackable` (the head stage's settings on one view) it
    trains as a stack of one (:func:`~imgclf.train.stacked.fit_stacked`), so it is the same head
    as the member of that seed in :func:`fit_heads`; otherwise in :func:`~imgclf.train.loops.fit_loop`."""
    cfg.validate()
    if stackable(cfg, x_train):
        return fit_stacked(x_train, y_train, x_val, y_val, n_classes, [cfg], [None], on_epoch=on_epoch, checkpoints=[checkpoint])[0]
    seed_everything(cfg.seed)
    xt = torch.from_numpy(np.asarray(x_train, np.float32))
    if xt.dim() == 2:
        xt = xt[None]  # a single (plain) view
    yt = torch.from_numpy(np.asarray(y_train, np.int64))
    xv = torch.from_numpy(np.asarray(x_val, np.float32))
    yv = torch.from_numpy(np.asarray(y_val, np.int64))
    head = build_head(cfg.head, xt.shape[-1], n_classes)
    if hasattr(head, "norm"):
        head.norm.fit(xt.reshape(-1, xt.shape[-1]))
    history, summary = fit_loop(head, xt, yt, xv, yv, n_classes, cfg, on_epoch=on_epoch, stage="head", checkpoint=checkpoint)
    return head, history, summary


def fit_heads(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    cfg: TrainConfig,
    members: int = 1,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint_for: Callable[[int], EpochCheckpoint | None] | None = None,
    parts: tuple[int, ...] | None = None,
    member_epochs: Sequence[int] | None = None,
) -> tuple[nn.Sequential, list[dict], dict]:
    """``members`` heads (:func:`fit_head` with seeds ``cfg.seed + k``), one head averaging their
    probabilities (:func:`~imgclf.model.heads.ensemble_head`); one member is :func:`fit_head`.

    ``parts``: a branched backbone's feature widths; then ``members`` heads train on each part's
    columns alone (seeds continuing across parts), so the average is a probability ensemble of
    the backbones. Each member trains, stops early and keeps its best epoch on its own, as a
    separately trained model would; ``on_epoch`` sees the first member's epochs (the history
    returned), and the run log gets one line per further member. ``checkpoint_for(k)``: member k's.

    ``member_epochs``: the refit (``refit``): member k trains exactly ``member_epochs[k]`` epochs
    (no early stopping, its last epoch kept), the number an earlier fit with validation chose
    for the member of the same seed."""
    bounds = part_bounds(parts)
    total = members * len(bounds)
    if member_epochs is not None and (len(member_epochs) != total or min(member_epochs) < 1):
        raise ValueError(f"member_epochs needs {total} epoch counts >= 1, got {list(member_epochs)}")
    member_bounds = [bound for bound in bounds for _ in range(members)]
    cfgs = [dataclasses.replace(cfg, seed=cfg.seed + k, **({} if member_epochs is None else {"epochs": int(member_epochs[k]), "patience": 0, "checkpoint": "last"}))
            for k in range(total)]
    checkpoint = checkpoint_for or (lambda k: None)
    if stackable(cfg, x_train):  # all members at once; each the head fit_head gives for its seed
        trained = fit_stacked(x_train, y_train, x_val, y_val, n_classes, cfgs, member_bounds, on_epoch=on_epoch,
                              checkpoints=[checkpoint(k) for k in range(total)])
    else:  # one after another (each checkpoint made as its member starts: it times the writes from then)
        trained = [fit_head(feature_columns(np.asarray(x_train), bound), y_train, feature_columns(np.asarray(x_val), bound), y_val, n_classes, cfgs[k], on_epoch=on_epoch if k == 0 else None,
                            checkpoint=checkpoint(k)) for k, bound in enumerate(member_bounds)]
    history = trained[0][1]
    heads, summaries = [], []
    for k, (bound, (head, _, summary)) in enumerate(zip(member_bounds, trained)):
        features = "" if bound is None else f" (features {bound[0]}:{bound[1]})"
        if member_epochs is not None:
            log.info("refit head %d of %d%s: %d epochs on %d images", k + 1, total, features, summary["epochs_run"], len(y_train))
        elif k > 0:
            log.info("head %d of %d%s: best epoch %d of %d, %s %.4f", k + 1, total, features,
                     summary["best_epoch"], summary["epochs_run"], summary["monitor"], summary["best_monitor"])
        heads.append(head if bound is None else on_slice(head, *bound))
        summaries.append(summary)
    if total == 1:
        return heads[0], history, summaries[0]
    head = ensemble_head(heads).eval()
    summary = {**summaries[0], "members": [{k: s[k] for k in ("best_epoch", "epochs_run", "best_monitor")} for s in summaries]}
    if len(y_val):
        xv, yv = torch.from_numpy(np.asarray(x_val, np.float32)), torch.from_numpy(np.asarray(y_val, np.int64))
        with torch.no_grad():
            first, averaged = (F.cross_entropy(h(xv), yv).item() for h in (heads[0], head))
        summary["members_val_loss"] = averaged
        log.info("heads: %d averaged, validation log loss %.4f (first head alone %.4f)", total, averaged, first)
    return head, history, summary
