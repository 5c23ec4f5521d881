"""Heads on cached features trained side by side, as one stack of tensors.

A head step on cached features is small (a batch of 32 through a 704 → 512 → N MLP): its
time goes mostly to the fixed cost of the forty-odd tensor operations, the optimiser and
the dropout draw, not to arithmetic. The default recipe trains ten such heads (five per
backbone) and then refits them; trained one after another, each pays that fixed cost on
every step. Here the heads of one feature width train at once: every member's weights are
a slice of stacked tensors, one step runs all members' batches through batched matrix
products, one loss and one (elementwise) optimiser step, so the fixed cost is paid once.

Each member still trains exactly as if it were alone: its initial weights come from
``seed_everything(seed)`` then ``build_head`` (as for a head trained alone in ``fit_loop``),
and its shuffles, mixup draws and dropout masks from its own generator seeded with its seed;
its loss is its own batch mean (summing the members' losses leaves each member's gradient
its own), it keeps its own best epoch, stops early on its own and then leaves the stack.
No stacked operation mixes members, so a member's weights do not depend on which others
train beside it (tested): ``fit_head`` (one member) and member k of ``fit_heads`` are the
same head (to float rounding).

Checkpoints are those of :func:`~imgclf.train.loops.fit_loop`: one file per member, its
weights, optimiser state and generator as if trained alone, all members written at the same
epoch; a resumed run continues each member from its own file. A kill between two members'
files leaves them an epoch apart: the laggards then train in a stack of their own, which gives
the same weights by the independence above (exactly on the CPU tested; a BLAS that rounds a
batched product of another size differently would differ in the last bits).

Supported: ``recipe``, ``linear`` and ``tutorial`` heads on one view of the features, Adam
or AdamW at a constant rate, best epoch by validation loss or accuracy (the head stage's
settings); anything else trains in ``fit_loop`` one head at a time.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from imgclf.model.heads import FeatureStandardize, build_head
from imgclf.train.checkpoint import EpochCheckpoint, LoopState
from imgclf.train.loops import (TrainConfig, better, class_weights, epoch_order, epoch_row, loop_identity, make_loss, make_optimizer,
                                seed_everything, stage_summary)

log = logging.getLogger("imgclf")

_SHIFTS = torch.arange(64, dtype=torch.int64)
_MEMBER_FIELDS = ("seed", "epochs", "patience", "checkpoint")  # what may differ between members trained together


def stackable(cfg: TrainConfig, x_train: np.ndarray) -> bool:
    """Whether heads of ``cfg`` on ``x_train`` train here (else in ``fit_loop``)."""
    return (np.ndim(x_train) == 2 and cfg.schedule == "constant" and not cfg.warmup_epochs and cfg.optimizer in ("adam", "adamw")
            and cfg.monitor in ("val_loss", "val_accuracy") and cfg.head in ("recipe", "linear", "tutorial"))


def dropout_scale(shape: tuple[int, ...], p: float, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Inverted-dropout multipliers (0 or 1/(1 − p)) of shape (members, *shape), member k's from
    ``generators[k]``. For p = 0.5 one random bit per unit (64 per draw), exact and far cheaper than
    a random number per unit (torch's CPU Bernoulli sampler dominated a head step's time)."""
    n = math.prod(shape)
    if p == 0.5:
        words = torch.stack([torch.randint(-2**63, 2**63 - 1, ((n + 63) // 64,), dtype=torch.int64, generator=g) for g in generators])
        bits = ((words.unsqueeze(-1) >> _SHIFTS) & 1).reshape(len(generators), -1)[:, :n]
        return bits.reshape(len(generators), *shape).to(torch.float32).mul_(2.0)
    keep = torch.stack([torch.rand(shape, generator=g) >= p for g in generators])
    return keep.to(torch.float32).div_(1.0 - p)


class HeadStack:
    """Members of one head architecture as stacked tensors: a Linear's weight as (M, in, out)
    and bias as (M, 1, out) (so ``baddbmm`` computes every member's layer at once), feature
    standardisation buffers as (M, D). ``params`` are the leaves the optimiser steps, in the
    order of ``head.parameters()``; :meth:`member_state` gives member k's ``state_dict``."""

    def __init__(self, layers: list[tuple[str, str, float]], tensors: dict[str, torch.Tensor], param_names: list[str]):
        self.layers, self.tensors, self.param_names = layers, tensors, param_names

    @classmethod
    def of(cls, heads: Sequence[nn.Sequential]) -> "HeadStack":
        layers: list[tuple[str, str, float]] = []
        for name, m in heads[0].named_children():
            if isinstance(m, FeatureStandardize):
                layers.append(("norm", name, 0.0))
            elif isinstance(m, nn.Linear):
                layers.append(("linear", name, 0.0))
            elif isinstance(m, nn.ReLU):
                layers.append(("relu", name, 0.0))
            elif isinstance(m, nn.Dropout):
                layers.append(("dropout", name, float(m.p)))
            elif isinstance(m, nn.LogSigmoid):
                layers.append(("logsigmoid", name, 0.0))
            else:
                raise ValueError(f"a head layer of type {type(m).__name__} cannot be stacked")
        states = [h.state_dict() for h in heads]
        tensors = {k: cls._stacked(k, [s[k] for s in states]) for k in states[0]}
        param_names = [k for k, _ in heads[0].named_parameters()]
        for k in param_names:
            tensors[k] = tensors[k].requires_grad_()
        return cls(layers, tensors, param_names)

    @staticmethod
    def _stacked(name: str, values: list[torch.Tensor]) -> torch.Tensor:
        if name.endswith(".weight") and values[0].dim() == 2:
            return torch.stack([v.t() for v in values]).contiguous()
        if name.endswith(".bias"):
            return torch.stack(values)[:, None, :].contiguous()
        return torch.stack(values).contiguous()

    @property
    def size(self) -> int:
        """How many members the stack holds."""
        return len(next(iter(self.tensors.values())))

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.tensors[k] for k in self.param_names]

    def member_value(self, name: str, stacked: torch.Tensor, k: int) -> torch.Tensor:
        """Member k's slice of ``stacked`` (a tensor laid out like ``tensors[name]``) in the head's own layout."""
        if name.endswith(".weight") and stacked.dim() == 3:
            return stacked[k].t().contiguous()
        if name.endswith(".bias") and stacked.dim() == 3:
            return stacked[k, 0].clone()
        return stacked[k].clone()

    def member_state(self, k: int) -> dict[str, torch.Tensor]:
        return {name: self.member_value(name, t.detach(), k) for name, t in self.tensors.items()}

    def select(self, keep: list[int]) -> "HeadStack":
        """The members ``keep`` (positions in this stack) as a new stack with new leaves."""
        index = torch.tensor(keep, dtype=torch.long)
        tensors = {k: t.detach().index_select(0, index) for k, t in self.tensors.items()}
        for k in self.param_names:
            tensors[k].requires_grad_()
        return HeadStack(self.layers, tensors, self.param_names)

    def __call__(self, x: torch.Tensor, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """(M, B, D) features → (M, B, N) logits; dropout (with each member's generator) only when ``generators`` are given."""
        t = self.tensors
        for kind, name, p in self.layers:
            if kind == "norm":
                x = (x - t[f"{name}.mean"][:, None, :]) / t[f"{name}.std"][:, None, :]
            elif kind == "linear":
                x = torch.baddbmm(t[f"{name}.bias"], x, t[f"{name}.weight"])
            elif kind == "relu":
                x = torch.relu(x)
            elif kind == "dropout":
                if generators is not None and p > 0:
                    x = x * dropout_scale(tuple(x.shape[1:]), p, generators)
            else:
                x = F.logsigmoid(x)
        return x


class StackOptimizer:
    """Adam/AdamW over a stack, stepping each member's slice of each parameter as a tensor of its
    own: the elementwise kernels then treat a member's values exactly as for a head trained
    alone (a vectorised kernel over one long stacked tensor would reach some of them through
    its scalar tail instead, and round them differently), so a member's update does not depend
    on which others share the stack. ``states``: each member's saved optimiser state (as a head
    trained alone keeps it), restored into its slices."""

    def __init__(self, stack: HeadStack, cfg: TrainConfig, states: list[dict] | None = None):
        self.stack = stack
        self.slices = [[p.detach()[i] for p in stack.params] for i in range(stack.size)]
        self.opt = make_optimizer([{"params": [v for member in self.slices for v in member]}], cfg)
        for i, member in enumerate(self.slices):
            state = (states[i] or {}).get("state") if states else None
            for j, (name, v) in enumerate(zip(stack.param_names, member)):
                if state and j in state:
                    self.opt.state[v] = {key: (value.clone() if key == "step" else HeadStack._stacked(name, [value])[0])
                                         for key, value in state[j].items()}

    def step(self) -> None:
        """One update from the stacked leaves' gradients (then cleared)."""
        for j, p in enumerate(self.stack.params):
            for i, member in enumerate(self.slices):
                member[j].grad = p.grad[i]
            p.grad = None
        self.opt.step()

    @property
    def lr(self) -> float:
        return self.opt.param_groups[-1]["lr"]

    def member_state(self, i: int) -> dict:
        """Member i's optimiser state in the form a head trained alone saves (``Optimizer.state_dict``:
        its parameters numbered 0.. in ``head.parameters()`` order, the same group settings)."""
        state = {}
        for j, (name, v) in enumerate(zip(self.stack.param_names, self.slices[i])):
            if v in self.opt.state:
                state[j] = {key: (value.clone() if key == "step" else self.stack.member_value(name, value[None], 0))
                            for key, value in self.opt.state[v].items()}
        settings = {k: copy.deepcopy(v) for k, v in self.opt.param_groups[0].items() if k != "params"}
        return {"state": state, "param_groups": [{**settings, "params": list(range(len(self.slices[i])))}]}


def _mean_losses(logits: torch.Tensor, y: torch.Tensor, loss_fn: nn.Module, weights: torch.Tensor | None) -> torch.Tensor:
    """Each member's batch-mean training loss, (M,): ``loss_fn`` (``make_loss(cfg, weights, "none")``)
    summed over the member's batch and divided as a head trained alone divides it
    (:func:`~imgclf.train.loops.loss_denominator`: the batch size, or its samples' class weights)."""
    m, b, n = logits.shape
    total = loss_fn(logits.reshape(m * b, n), y.reshape(-1)).view(m, b).sum(1)
    return total / b if weights is None else total / weights[y].sum(1)


@dataclass
class _Member:
    """One head's progress: what ``fit_loop`` keeps for a head trained alone."""

    index: int
    cfg: TrainConfig
    bound: tuple[int, int] | None
    checkpoint: EpochCheckpoint | None
    identity: dict  # of its checkpoint file, as fit_loop's
    generator: torch.Generator
    head: nn.Sequential
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best: tuple[float, float] = (math.inf, -math.inf)
    best_epoch: int = 0
    stale: int = 0
    best_state: dict | None = None
    optimizer: dict | None = None
    summary: dict | None = None

    @property
    def stopped(self) -> bool:
        return self.epoch >= self.cfg.epochs or bool(self.cfg.patience and self.stale >= self.cfg.patience)


def fit_stacked(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    cfgs: Sequence[TrainConfig],
    bounds: Sequence[tuple[int, int] | None],
    on_epoch: Callable[[dict], None] | None = None,
    checkpoints: Sequence[EpochCheckpoint | None] | None = None,
) -> list[tuple[nn.Sequential, list[dict], dict]]:
    """Member k: a head on feature columns ``bounds[k]`` (None: all) trained with ``cfgs[k]``
    (settings other than seed, epochs, patience and checkpoint shared); returns each member's
    (head, history, summary) as :func:`~imgclf.train.heads.fit_head` would. ``on_epoch`` sees
    member 0's epochs; ``checkpoints[k]``: member k's file (saved and resumed as ``fit_loop``'s)."""
    cfg = cfgs[0]
    for c in cfgs:
        c.validate()
        if {k: v for k, v in c.to_dict().items() if k not in _MEMBER_FIELDS} != {k: v for k, v in cfg.to_dict().items() if k not in _MEMBER_FIELDS}:
            raise ValueError("heads trained together must share their settings other than seed, epochs, patience and checkpoint")
    checkpoints = list(checkpoints) if checkpoints is not None else [None] * len(cfgs)
    x_all = torch.from_numpy(np.asarray(x_train, np.float32))
    xv_all = torch.from_numpy(np.asarray(x_val, np.float32)).reshape(len(y_val), x_all.shape[1])
    yt = torch.from_numpy(np.asarray(y_train, np.int64))
    yv = torch.from_numpy(np.asarray(y_val, np.int64))
    weights = class_weights(yt.numpy(), n_classes, cfg.class_weight)

    members: list[_Member] = []
    for k, (c, bound) in enumerate(zip(cfgs, bounds)):
        xt = feature_columns(x_all, bound)
        seed_everything(c.seed)
        head = build_head(c.head, xt.shape[1], n_classes)
        if hasattr(head, "norm"):
            head.norm.fit(xt)
        identity = loop_identity("head", c, n_classes, xt[None], yt, feature_columns(xv_all, bound), yv, False, [[list(p.shape) for p in head.parameters()]])
        member = _Member(k, c, bound, checkpoints[k], identity, torch.Generator().manual_seed(c.seed), head)
        saved = member.checkpoint.load(identity) if member.checkpoint is not None else None
        where = member.checkpoint.path if member.checkpoint is not None else ""
        if saved is not None and saved.done:
            log.info("head: finished before the interruption (checkpoint %s); not trained again", where)
            head.load_state_dict(saved.model)
            member.history, member.summary, member.epoch = saved.history, saved.summary, len(saved.history)
        elif saved is not None:
            head.load_state_dict(saved.model)
            member.optimizer = saved.optimizer
            member.generator.set_state(saved.generator)
            member.history, member.best, member.best_epoch, member.stale, member.best_state = (
                saved.history, tuple(saved.best), saved.best_epoch, saved.stale, saved.best_state)
            member.epoch = saved.epoch
            log.info("head: resuming after epoch %d of %d from checkpoint %s", saved.epoch, c.epochs, where)
        members.append(member)

    todo = [m for m in members if m.summary is None]
    for width in sorted({_in_dim(m.head) for m in todo}):
        for start in sorted({m.epoch for m in todo if _in_dim(m.head) == width}):
            group = [m for m in todo if _in_dim(m.head) == width and m.epoch == start]
            _train_together(group, x_all, yt, xv_all, yv, weights, cfg, on_epoch)
    return [(m.head.eval(), m.history, m.summary) for m in members]


def feature_columns(x, bound: tuple[int, int] | None):
    """Feature columns ``[start, stop)`` of ``x`` (array or tensor, features last); all of them for None."""
    return x if bound is None else x[..., bound[0]:bound[1]]


def _in_dim(head: nn.Sequential) -> int:
    return next(m.in_features for m in head if isinstance(m, nn.Linear))


def _parts(x: torch.Tensor, bounds: list[tuple[int, int] | None]) -> torch.Tensor:
    """(P, n, D): the columns of each of ``bounds`` (all of them for None), a view without a copy when the
    parts are consecutive column blocks of one width (a branched backbone's), else stacked."""
    if bounds == [None]:
        return x[None]
    if None not in bounds:
        start, width = bounds[0][0], bounds[0][1] - bounds[0][0]
        if all(b == (start + i * width, start + (i + 1) * width) for i, b in enumerate(bounds)):
            return x[:, start:start + len(bounds) * width].unflatten(1, (len(bounds), width)).transpose(0, 1)
    return torch.stack([feature_columns(x, b) for b in bounds])


def _train_together(group: list[_Member], x_all: torch.Tensor, yt: torch.Tensor, xv_all: torch.Tensor, yv: torch.Tensor,
                    weights: torch.Tensor | None, cfg: TrainConfig, on_epoch: Callable[[dict], None] | None) -> None:
    """Train the members of ``group`` (same feature width, same epoch reached) to their ends."""
    has_val = len(yv) > 0
    eval_loss = nn.CrossEntropyLoss(reduction="none")
    loss_fn = make_loss(cfg, weights, "none")
    parts = {m.bound for m in group}
    part_of = {b: i for i, b in enumerate(sorted(parts, key=lambda b: (-1, -1) if b is None else b))}
    x_parts, xv_parts = _parts(x_all, list(part_of)), _parts(xv_all, list(part_of))  # (P, n, D): each member reads its part
    for m in group:
        if m.stopped:  # resumed after its last epoch, before its final file
            _finish(m, None, None, weights, has_val)
    active = [m for m in group if m.summary is None]
    if not active:
        return
    stack = HeadStack.of([m.head for m in active])
    opt = StackOptimizer(stack, cfg, [m.optimizer for m in active])
    n, b = len(yt), cfg.batch_size
    while active:
        part_index = torch.tensor([part_of[m.bound] for m in active], dtype=torch.long)
        gens = [m.generator for m in active]
        orders = torch.stack([epoch_order(yt, m.cfg, m.generator) for m in active])
        loss_sum, correct = torch.zeros(len(active)), torch.zeros(len(active), dtype=torch.long)
        for start in range(0, n, b):
            idx = orders[:, start:start + b]
            xb, yb = x_parts[part_index[:, None], idx], yt[idx]
            if cfg.mixup > 0:  # each member's draws in the order a head trained alone makes them
                perms, lams = [], []
                for g in gens:
                    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=g)))
                    perms.append(torch.randperm(idx.shape[1], generator=g))
                    lams.append(float(rng.beta(cfg.mixup, cfg.mixup)))
                perm, lam = torch.stack(perms), torch.tensor(lams)
                mixed = torch.lerp(torch.gather(xb, 1, perm[..., None].expand_as(xb)), xb, lam[:, None, None])
                logits = stack(mixed, gens)
                losses = lam * _mean_losses(logits, yb, loss_fn, weights) + (1 - lam) * _mean_losses(logits, torch.gather(yb, 1, perm), loss_fn, weights)
            else:
                logits = stack(xb, gens)
                losses = _mean_losses(logits, yb, loss_fn, weights)
            losses.sum().backward()
            opt.step()
            loss_sum += losses.detach() * idx.shape[1]
            correct += (logits.detach().argmax(2) == yb).sum(1)
        tr_loss, tr_acc = (loss_sum / n).tolist(), (correct.double() / n).tolist()
        if has_val:
            with torch.no_grad():
                lv = torch.cat([stack(xv_parts[part_index[:, None], torch.arange(k, min(k + 1024, len(yv)))[None, :]])
                                for k in range(0, len(yv), 1024)], 1)  # in chunks: (members, rows, D) copies stay small
                va_loss = eval_loss(lv.reshape(-1, lv.shape[-1]), yv.repeat(len(active))).view(len(active), -1).mean(1).tolist()
                va_acc = (lv.argmax(2) == yv).double().mean(1).tolist()
        for i, m in enumerate(active):
            m.epoch += 1
            if has_val:
                score, loss, acc = (va_loss[i], va_acc[i]), va_loss[i], va_acc[i]
            else:
                score, loss, acc = (tr_loss[i], tr_acc[i]), float("nan"), float("nan")
            improved = better(score, m.best, m.cfg.monitor if has_val else "val_loss")
            if improved:
                m.best, m.best_epoch, m.stale = score, m.epoch, 0
                if m.cfg.checkpoint == "best":
                    m.best_state = stack.member_state(i)
            else:
                m.stale += 1
            m.history.append(epoch_row("head", m.epoch, (tr_loss[i], tr_acc[i]), (loss, acc), None, improved, opt.lr))
        if any(m.checkpoint is not None and m.checkpoint.due() for m in active):
            for i, m in enumerate(active):
                if m.checkpoint is not None:
                    m.checkpoint.save(LoopState(
                        epoch=m.epoch, done=False, model=stack.member_state(i), history=m.history, best=m.best, best_epoch=m.best_epoch,
                        stale=m.stale, best_state=m.best_state, optimizer=opt.member_state(i),
                        generator=m.generator.get_state()), m.identity)
        if on_epoch and active[0].index == 0:
            on_epoch(active[0].history[-1])
        keep = [i for i, m in enumerate(active) if not m.stopped]
        for i, m in enumerate(active):
            if m.stopped:
                _finish(m, stack, i, weights, has_val)
        if len(keep) < len(active):
            states = [opt.member_state(i) for i in keep]
            active = [active[i] for i in keep]
            if active:
                stack = stack.select(keep)
                opt = StackOptimizer(stack, cfg, states)


def _finish(m: _Member, stack: HeadStack | None, i: int | None, weights: torch.Tensor | None, has_val: bool) -> None:
    """Member ``m`` has trained its epochs or stopped early: its kept weights, summary and final checkpoint."""
    if stack is not None:
        m.head.load_state_dict(stack.member_state(i))
    if m.cfg.checkpoint == "best" and m.best_state is not None:
        m.head.load_state_dict(m.best_state)
    m.summary = stage_summary("head", m.cfg, m.history, m.best, m.best_epoch, has_val, weights)
    if m.checkpoint is not None:
        m.checkpoint.save(LoopState(epoch=len(m.history), done=True, model=m.head.state_dict(), history=m.history, best=m.best,
                                    best_epoch=m.best_epoch, stale=m.stale, summary=m.summary), m.identity)


