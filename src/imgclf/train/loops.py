"""Training loops: plain functions, every setting a flag.

Like torchvision's classification reference: ``train_one_epoch`` and ``evaluate`` are
plain functions; ``fit_head`` adds the optimiser, schedule, best-by-validation
checkpointing and early stopping for a head on cached features (with optional K
augmented feature views per image). Same seed + same features ⇒ same weights.
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable
import dataclasses
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from imgclf.config.settings import TRAIN_FIELDS, TrainSettings, check_value
from imgclf.train.checkpoint import EpochCheckpoint, LoopState, capture_global_rng, labels_digest, restore_global_rng

log = logging.getLogger("imgclf")


def calibrated_nll(probs: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Validation cross-entropy after temperature scaling: (loss, temperature).

    softmax(log p / T) with the one T that minimises the loss (Guo et al. 2017). It
    compares models by how well they rank the classes, not by how confident their
    training made them: label smoothing raises plain cross-entropy at equal ranking
    quality, and a head trained to zero loss is over-confident; one temperature undoes
    either. T is searched in [0.03, 30] (bounded Brent search over log T).
    On a validation split the model separates perfectly the loss falls towards 0 as T
    shrinks; at the floor T = 0.03 it then measures the margins (such a model beats any
    that makes a mistake, and among such models the wider margins win).
    """
    if len(y) == 0:
        return float("nan"), 1.0
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logp = np.log(np.clip(np.asarray(probs, np.float64), 1e-300, None))
    idx = np.arange(len(y))

    def nll(log_t: float) -> float:  # convex in 1/T, so one minimum over log T
        return float(-log_softmax(logp / math.exp(log_t), axis=1)[idx, y].mean())

    res = minimize_scalar(nll, bounds=(math.log(0.03), math.log(30.0)), method="bounded", options={"xatol": 1e-6})
    return float(res.fun), math.exp(res.x)


def better(score: tuple[float, float], best: tuple[float, float], monitor: str) -> bool:
    """Is ``score`` = (loss, accuracy) better than ``best``? ``loss`` is the monitored
    loss (plain or temperature-calibrated cross-entropy).

    ``val_accuracy`` ranks by accuracy first and loss second: a stage trained with label
    smoothing has a higher cross-entropy at the same accuracy, so loss alone would
    unfairly favour a model trained without it.
    """
    loss, acc = score
    best_loss, best_acc = best
    if monitor == "val_accuracy" and not (math.isnan(acc) or math.isnan(best_acc)):
        if acc != best_acc:
            return acc > best_acc
    return loss < best_loss - 1e-6


def _declared(name: str):
    return TRAIN_FIELDS[name].default


# A TrainConfig field that is a per-stage value of a stage-2 setting is checked against it
_STAGE2_DECLARATION = {
    "optimizer": "finetune_optimizer", "weight_decay": "finetune_weight_decay", "warmup_epochs": "finetune_warmup_epochs",
    "schedule": "finetune_schedule", "monitor": "finetune_monitor", "cutmix": "finetune_cutmix",
}


@dataclass
class TrainConfig:
    """One training stage's values for the loops below.

    Not a second declaration: defaults are stage 1's declared defaults, every value is
    checked against its setting's declaration, and :meth:`stage1` / :meth:`stage2` are
    the only ways the training classifier builds one from its settings.
    """

    head: str = _declared("head")
    epochs: int = _declared("epochs")
    lr: float = _declared("lr")
    batch_size: int = _declared("batch_size")
    patience: int = _declared("patience")
    class_weight: str = _declared("class_weight")
    weight_decay: float = 0.0
    seed: int = _declared("seed")
    optimizer: str = "adam"
    warmup_epochs: float = 0.0
    schedule: str = "constant"
    label_smoothing: float = _declared("label_smoothing")
    loss: str = _declared("loss")
    focal_gamma: float = _declared("focal_gamma")
    sampler: str = _declared("sampler")
    mixup: float = _declared("mixup")  # Beta(a, a) mixing of the trainable part's inputs; 0 = off
    cutmix: float = 0.0  # Beta(a, a) box mixing of spatial inputs (stage 2's prefix activations); 0 = off
    checkpoint: str = _declared("checkpoint")  # best (by ``monitor``) | last
    monitor: str = "val_loss"  # val_loss | val_accuracy (ties: lower loss) | val_calibrated_loss (see calibrated_nll)

    @classmethod
    def stage1(cls, s: TrainSettings) -> "TrainConfig":
        """The head on cached features: Adam, constant rate, best by validation loss."""
        return cls(head=s.head, epochs=s.epochs, lr=s.lr, batch_size=s.batch_size, patience=s.patience, class_weight=s.class_weight,
                   seed=s.seed, label_smoothing=s.label_smoothing, loss=s.loss, focal_gamma=s.focal_gamma, sampler=s.sampler,
                   mixup=s.mixup, checkpoint=s.checkpoint)

    @classmethod
    def stage2(cls, s: TrainSettings) -> "TrainConfig":
        """The unfrozen tail with the head: every ``finetune_*`` setting, best checkpoint."""
        return dataclasses.replace(
            cls.stage1(s), epochs=s.finetune_epochs, lr=s.finetune_lr, patience=s.finetune_patience, optimizer=s.finetune_optimizer,
            weight_decay=s.finetune_weight_decay, warmup_epochs=s.finetune_warmup_epochs, schedule=s.finetune_schedule,
            checkpoint="best", label_smoothing=s.finetune_label_smoothing, monitor=s.finetune_monitor, cutmix=s.finetune_cutmix,
        )

    def validate(self) -> "TrainConfig":
        for name, value in asdict(self).items():
            check_value(TRAIN_FIELDS[_STAGE2_DECLARATION.get(name, name)], value)
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def class_weights(y: np.ndarray, n_classes: int, mode: str) -> torch.Tensor | None:
    """Inverse-frequency weights; ``auto`` uses them when the largest class is > 1.5× the smallest."""
    if mode == "none":
        return None
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    present = counts[counts > 0]
    if mode == "auto" and present.max() <= 1.5 * present.min():
        return None
    w = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): down-weights easy examples; ``weight`` = per-class alpha."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, reduction: str = "mean"):
        super().__init__()
        self.gamma = gamma
        self.reduction = reduction
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits, target):
        logp = F.log_softmax(logits.float(), 1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - logp.exp()) ** self.gamma) * logp
        w = self.weight[target] if self.weight is not None else None
        if w is not None:
            loss = loss * w
        if self.reduction == "none":
            return loss
        if self.reduction == "sum":
            return loss.sum()
        return loss.sum() / w.sum() if w is not None else loss.mean()


def make_loss(cfg: TrainConfig, weights: torch.Tensor | None, reduction: str = "mean") -> nn.Module:
    """The training loss; ``reduction="sum"`` gives the numerator of the mean (the weighted sum),
    which a data-parallel rank divides by its global batch's denominator (:class:`ShardBatch`);
    ``"none"`` each sample's (weighted) term of that sum."""
    if cfg.loss == "focal":
        return FocalLoss(cfg.focal_gamma, weights, reduction)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing, reduction=reduction)


def loss_denominator(y: torch.Tensor, weights: torch.Tensor | None) -> float:
    """What the mean loss of a batch with labels ``y`` divides its sum by: the batch size, or
    with class weights the sum of its samples' weights (as torch's weighted mean does)."""
    return float(len(y)) if weights is None else float(weights[y].sum())


class ShardBatch(NamedTuple):
    """One rank's part of one global batch under data parallelism.

    The loss is ``sum / loss_norm`` with ``loss_norm`` = the global batch's denominator divided
    by ``world_size``; the DDP gradient average over the ranks then equals the gradient of the
    global batch's mean loss, as in one process. ``global_size`` keeps every rank's random
    draws the same (mixup and CutMix permutations are drawn for the global batch)."""

    x: torch.Tensor
    y: torch.Tensor
    loss_norm: float
    global_size: int
    world_size: int


def make_optimizer(param_groups, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Adam/AdamW; the fused CPU kernel where this torch has it, because it is faster on a
    small head (see benchmarks/README.md)."""
    groups = list(param_groups)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    try:
        return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Linear warmup then constant or cosine decay, stepped per batch."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def factor(step):
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_order(y: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Sample order for one epoch: a shuffle, or class-balanced sampling with replacement."""
    n = len(y)
    if cfg.sampler == "balanced":
        counts = torch.bincount(y).float()
        w = 1.0 / counts[y]
        return torch.multinomial(w, n, replacement=True, generator=generator)
    return torch.randperm(n, generator=generator)


def cutmix_batch(x: torch.Tensor, perm: torch.Tensor, lam: float, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    """CutMix (Yun et al. 2019) on (N, C, H, W) inputs: a box of area ≈ (1 − lam) from the
    permuted batch is pasted in; returns the mixed batch and lam recomputed from the box
    actually pasted (it is clipped at the borders)."""
    h, w = x.shape[-2:]
    r = math.sqrt(max(0.0, 1.0 - lam))
    ch, cw = int(round(h * r)), int(round(w * r))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y1, y2 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
    x1, x2 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
    out = x.clone()
    out[..., y1:y2, x1:x2] = x[perm][..., y1:y2, x1:x2]
    return out, 1.0 - (y2 - y1) * (x2 - x1) / (h * w)


def train_one_epoch(
    model: nn.Module,
    batches,
    optimizer,
    loss_fn,
    cfg: TrainConfig,
    generator: torch.Generator,
    scheduler=None,
    scaler=None,
    reduce: Callable[[list[float]], list[float]] | None = None,
) -> tuple[float, float]:
    """One pass over ``batches`` (iterable of (inputs, targets), or :class:`ShardBatch` under
    data parallelism); returns (loss, accuracy).

    Inputs move to the model's device. ``scaler``: a GradScaler (fp16 autocast on a GPU).
    ``reduce``: sums [loss, correct, seen] over the ranks, so every rank reports the epoch's."""
    model.train()
    device = next(model.parameters()).device
    total_loss, correct, seen = 0.0, 0, 0
    for batch in batches:
        shard = isinstance(batch, ShardBatch)
        xb, yb = batch[0].to(device), batch[1].to(device)
        n_batch = batch.global_size if shard else len(yb)
        batch_loss = (lambda logits, y: loss_fn(logits, y) / batch.loss_norm) if shard else loss_fn
        cut = cfg.cutmix > 0 and xb.dim() == 4
        if cfg.mixup > 0 or cut:
            rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator)))
            perm = torch.randperm(n_batch, generator=generator)
            if len(perm) != len(yb):  # this rank's part: the global draw, restricted to a permutation of its samples
                perm = torch.argsort(perm[:len(yb)])
            perm = perm.to(device)
            if cut and (cfg.mixup <= 0 or rng.random() < 0.5):  # both on: one or the other per batch
                mixed, lam = cutmix_batch(xb, perm, float(rng.beta(cfg.cutmix, cfg.cutmix)), rng)
            else:
                lam = float(rng.beta(cfg.mixup, cfg.mixup))
                mixed = lam * xb + (1 - lam) * xb[perm]
            logits = model(mixed)
            loss = lam * batch_loss(logits, yb) + (1 - lam) * batch_loss(logits, yb[perm])
        else:
            logits = model(xb)
            loss = batch_loss(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total_loss += loss.item() * (n_batch / batch.world_size if shard else len(yb))
        correct += (logits.argmax(1) == yb).sum().item()
        seen += len(yb)
    if reduce is not None:
        total_loss, correct, seen = reduce([total_loss, correct, seen])
    return total_loss / max(1, seen), correct / max(1, seen)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """float32 logits on the CPU of ``x``, computed in chunks on the model's device (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    if not len(x):
        return model(x.to(device)).float().cpu()
    return torch.cat([model(x[k:k + 256].to(device)).float().cpu() for k in range(0, len(x), 256)])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn) -> tuple[float, float, np.ndarray]:
    """Loss, accuracy and softmax probabilities on a split (eval mode: no dropout)."""
    return scores_from_logits(predict_logits(model, x), y, loss_fn)


def scores_from_logits(logits: torch.Tensor, y: torch.Tensor, loss_fn) -> tuple[float, float, np.ndarray]:
    """(loss, accuracy, softmax probabilities) of a split's logits."""
    loss = loss_fn(logits, y).item() if len(y) else float("nan")
    acc = (logits.argmax(1) == y).float().mean().item() if len(y) else float("nan")
    return loss, acc, torch.softmax(logits.float(), 1).numpy()


def view_batches(xt: torch.Tensor, yt: torch.Tensor, cfg: TrainConfig, gen: torch.Generator):
    """Batches from ``xt`` of shape (views, n, ...): each sample gets a random view per epoch."""
    order = epoch_order(yt, cfg, gen)
    view = torch.randint(0, xt.shape[0], (len(yt),), generator=gen) if xt.shape[0] > 1 else torch.zeros(len(yt), dtype=torch.long)
    for k in range(0, len(order), cfg.batch_size):
        idx = order[k:k + cfg.batch_size]
        yield xt[view[idx], idx], yt[idx]


def loop_identity(stage: str, cfg: TrainConfig, n_classes: int, xt: torch.Tensor, yt: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor,
                  keep_start_if_best: bool, parameters: list[list[list[int]]]) -> dict:
    """What a stage's checkpoint belongs to: settings, data shapes (``xt`` as (views, n, ...); under
    parallel those of the whole data set), a digest of the labels, the parameters' shapes per group."""
    return {
        "stage": stage, "config": cfg.to_dict(), "n_classes": n_classes, "train_shape": [xt.shape[0], len(yt), *xt.shape[2:]],
        "val_shape": [len(yv), *xv.shape[1:]],
        "labels": labels_digest(yt, yv), "keep_start_if_best": keep_start_if_best,
        "parameters": parameters,
    }


def epoch_row(stage: str, epoch: int, train: tuple[float, float], val: tuple[float, float], val_calibrated: float | None,
              improved: bool, lr: float) -> dict:
    """One epoch's line of a stage's history (the run log, ``metrics.csv``, the report's curves):
    ``train`` and ``val`` as (loss, accuracy)."""
    return {"stage": stage, "epoch": epoch, "train_loss": train[0], "train_accuracy": train[1], "val_loss": val[0], "val_accuracy": val[1],
            "val_calibrated_loss": val_calibrated, "best": improved, "lr": lr}


def stage_summary(stage: str, cfg: TrainConfig, history: list[dict], best: tuple[float, float], best_epoch: int, has_val: bool,
                  weights: torch.Tensor | None, kept_start: bool = False) -> dict:
    """What a finished stage reports (``fit_summary``'s stages, the run log, the report)."""
    return {
        "stage": stage,
        "best_epoch": best_epoch if cfg.checkpoint == "best" else len(history),
        "kept_start": kept_start,
        "epochs_run": len(history),
        "monitor": cfg.monitor if has_val else "train_loss",
        "best_monitor": best[0],
        "best_accuracy": best[1],
        "checkpoint": cfg.checkpoint,
        "class_weights": None if weights is None else [round(float(w), 6) for w in weights],
        "stopped_early": len(history) < cfg.epochs,
    }


def fit_loop(
    model: nn.Module,
    xt: torch.Tensor,
    yt: torch.Tensor,
    xv: torch.Tensor,
    yv: torch.Tensor,
    n_classes: int,
    cfg: TrainConfig,
    param_groups=None,
    on_epoch: Callable[[dict], None] | None = None,
    stage: str = "head",
    keep_start_if_best: bool = False,
    checkpoint: EpochCheckpoint | None = None,
    scaler=None,
    parallel=None,
) -> tuple[list[dict], dict]:
    """Shared epoch loop: optimiser, schedule, validation, early stopping, checkpoint.

    ``xt`` is (views, n, ...): each epoch draws one view per sample (:func:`view_batches`).
    Trains ``model`` in place and leaves the selected (best or last) weights loaded.
    ``keep_start_if_best``: the starting weights (epoch 0) compete for "best", so a
    stage that only hurts validation loss returns the model it was given.
    ``checkpoint``: after an epoch the loop's whole state is saved there when the checkpoint
    is due (:meth:`EpochCheckpoint.due`: at most every ``SAVE_EVERY_S``), and at the end
    the selected model with history and summary; a saved state found there at the start is
    continued from (a finished stage is not trained again), so a killed run resumed with the
    same settings and data ends with the same model as one never interrupted.
    The model trains on its own device (inputs are moved batch by batch); ``scaler``: a
    GradScaler for fp16 autocast on a GPU.

    ``parallel`` (data parallelism under torchrun, see :class:`imgclf.train.finetune.ShardedTail`):
    ``xt`` and ``xv`` then hold this rank's samples while ``yt`` and ``yv`` hold every label;
    the model trains wrapped by ``parallel.wrap`` on ``parallel.batches`` (this rank's part of
    each global batch), validation logits are gathered from all ranks, and rank 0's score is
    every rank's (``parallel.agree``), so best epoch, early stopping and keep-the-start are
    decided once; only rank 0 (``parallel.is_main``) reads and writes the checkpoint.
    """
    device = next(model.parameters()).device
    weights = class_weights(yt.numpy(), n_classes, cfg.class_weight)
    steps_per_epoch = math.ceil(len(yt) / cfg.batch_size)
    loss_fn = make_loss(cfg, weights, "sum" if parallel is not None else "mean").to(device)
    eval_loss_fn = nn.CrossEntropyLoss()
    is_main = parallel is None or parallel.is_main
    trained = model if parallel is None else parallel.wrap(model)
    optimizer = make_optimizer(param_groups if param_groups is not None else [{"params": [p for p in model.parameters() if p.requires_grad]}], cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch) if (cfg.schedule != "constant" or cfg.warmup_epochs) else None
    gen = torch.Generator().manual_seed(cfg.seed)
    has_val = len(yv) > 0
    history: list[dict] = []
    monitor_kind = cfg.monitor if has_val else "val_loss"  # without validation: training loss
    best_state, best_epoch, best, stale = None, 0, (math.inf, -math.inf), 0
    calibrated = monitor_kind == "val_calibrated_loss"

    def val_score() -> tuple[tuple[float, float], float, float, float | None]:
        """(monitored (loss, accuracy), loss, accuracy, calibrated loss or None)."""
        if parallel is None:
            loss, acc, probs = evaluate(model, xv, yv, eval_loss_fn)
        else:
            loss, acc, probs = scores_from_logits(parallel.gather_logits(predict_logits(model, xv), len(yv)), yv, eval_loss_fn)
        cal = calibrated_nll(probs, yv.numpy())[0] if calibrated else None
        result = ((cal if calibrated else loss), acc), loss, acc, cal
        return result if parallel is None else parallel.agree(result)

    identity = loop_identity(stage, cfg, n_classes, xt, yt, xv, yv, keep_start_if_best,
                             [[list(p.shape) for p in g["params"]] for g in optimizer.param_groups])
    saved = checkpoint.load(identity) if checkpoint is not None and is_main else None
    if parallel is not None:
        saved = parallel.agree(saved)
    where = checkpoint.path if checkpoint is not None else "of rank 0"
    if saved is not None and saved.done:
        log.info("%s: finished before the interruption (checkpoint %s); not trained again", stage, where)
        model.load_state_dict(saved.model)
        model.eval()
        return saved.history, saved.summary
    first_epoch = 1
    if saved is not None:
        model.load_state_dict(saved.model)
        optimizer.load_state_dict(saved.optimizer)
        if scheduler is not None:
            scheduler.load_state_dict(saved.scheduler)
        gen.set_state(saved.generator)
        restore_global_rng(saved.rng)
        history = saved.history
        best, best_epoch, stale, best_state = saved.best, saved.best_epoch, saved.stale, saved.best_state
        first_epoch = saved.epoch + 1
        log.info("%s: resuming after epoch %d of %d from checkpoint %s", stage, saved.epoch, cfg.epochs, where)
    elif keep_start_if_best and has_val and cfg.checkpoint == "best":
        best = val_score()[0]
        best_state = copy.deepcopy(model.state_dict())
    stopped = bool(cfg.patience and stale >= cfg.patience)  # a resumed stage may have stopped early already
    for epoch in range(first_epoch, cfg.epochs + 1):
        if stopped:
            break
        batches = view_batches(xt, yt, cfg, gen) if parallel is None else parallel.batches(xt, yt, cfg, gen, weights)
        tr_loss, tr_acc = train_one_epoch(trained, batches, optimizer, loss_fn, cfg, gen, scheduler, scaler=scaler,
                                          reduce=None if parallel is None else parallel.sum)
        if has_val:
            score, va_loss, va_acc, va_cal = val_score()
        else:
            score, va_loss, va_acc, va_cal = (tr_loss, tr_acc), float("nan"), float("nan"), None
        improved = better(score, best, monitor_kind)
        if improved:
            best, best_epoch, stale = score, epoch, 0
            if cfg.checkpoint == "best":
                best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        row = epoch_row(stage, epoch, (tr_loss, tr_acc), (va_loss, va_acc), va_cal, improved, optimizer.param_groups[-1]["lr"])
        history.append(row)
        stopped = bool(cfg.patience and stale >= cfg.patience)
        if checkpoint is not None and is_main and checkpoint.due():
            checkpoint.save(LoopState(
                epoch=epoch, done=False, model=model.state_dict(), history=history, best=best, best_epoch=best_epoch, stale=stale,
                best_state=best_state, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict() if scheduler is not None else None,
                generator=gen.get_state(), rng=capture_global_rng(),
            ), identity)
        if on_epoch:
            on_epoch(row)
    if cfg.checkpoint == "best" and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    summary = stage_summary(stage, cfg, history, best, best_epoch, has_val, weights,
                            kept_start=keep_start_if_best and best_epoch == 0 and best_state is not None)
    if checkpoint is not None and is_main:
        checkpoint.save(LoopState(epoch=len(history), done=True, model=model.state_dict(), history=history, best=best, best_epoch=best_epoch,
                                  stale=stale, summary=summary), identity)
    return history, summary
