"""Classifier heads trained on cached backbone features.

``recipe`` is the tutorial's head (Dense 512 + ReLU, Dropout 0.5, Dense N) with its
faults fixed: it ends in logits (softmax cross-entropy for every N >= 2, binary
included), not a sigmoid feeding a softmax-style loss. Global max pooling, which the
recipe put in the head, is the backbone entry's pooling step (vgg16: max), done once
before caching. Both heads start with a fixed standardisation of the features (train
mean/std) so one learning rate suits every backbone's feature scale.

``tutorial`` is the tutorial's head as written, for ``--recipe seed`` only: no feature
standardisation and a sigmoid on the Dense N outputs feeding categorical cross-entropy.
Keras' ``categorical_crossentropy`` on non-softmax outputs divides them by their sum,
so the loss is −log(σ(z_y) / Σσ(z_j)). Ending the module in ``LogSigmoid`` reproduces
that exactly with the shared softmax cross-entropy: softmax(log σ(z)) = σ(z) / Σσ(z);
and the probabilities predict/export compute (softmax of the output) are the same
normalised sigmoids.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from imgclf.config.settings import HEAD_KINDS, MAX_HEADS



class FeatureStandardize(nn.Module):
    """(x - mean) / s: per-feature mean, one global scale ``s`` (training features).

    A single scale (not per-feature std) keeps near-constant channels from being blown
    up: per-feature std on a small training set turned unseen activations into huge
    values and validation loss diverged.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, x: torch.Tensor) -> "FeatureStandardize":
        self.mean.copy_(x.mean(0))
        centred = x - self.mean
        scale = centred.pow(2).mean().sqrt().clamp_min(1e-6)
        self.std.fill_(float(scale))
        return self

    def forward(self, x):
        return (x - self.mean) / self.std


class LogitTemperature(nn.Module):
    """Divides the logits by the head's fitted temperature (post-hoc calibration,
    :mod:`imgclf.evaluation.calibration`). As the head's last layer it travels with the
    head's tensors into the bundle, the ONNX export and every predictor."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x):
        return x / self.temperature


class HeadMembers(nn.ModuleList):
    """Several heads on the same features, one output: the log of their mean probability.

    ``softmax`` of that output is the members' averaged probabilities, so every consumer of
    a head (loss, temperature, threshold, export, Grad-CAM) treats the ensemble as one head.
    Averaging probabilities of heads trained from different seeds lowers the variance a
    single small head has on a few hundred images (benchmarks/README.md, "Several heads").
    """

    def forward(self, x):
        log_probs = torch.stack([torch.log_softmax(member(x), dim=1) for member in self], 0)
        return torch.logsumexp(log_probs, 0) - math.log(len(self))


class FeatureSlice(nn.Module):
    """Feature columns ``[start, stop)``: the part of a branched backbone's features that one of
    its backbones computed, so a head trained on that backbone alone sees exactly those."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = int(start), int(stop)

    def forward(self, x):
        return x[:, self.start:self.stop]

    def extra_repr(self) -> str:
        return f"start={self.start}, stop={self.stop}"


def on_slice(head: nn.Sequential, start: int, stop: int) -> nn.Sequential:
    """``head`` reading only feature columns ``[start, stop)`` (a layer ``features`` in front)."""
    return nn.Sequential(OrderedDict([("features", FeatureSlice(start, stop)), *head.named_children()]))


def part_bounds(parts: tuple[int, ...] | list[int] | None) -> list[tuple[int, int] | None]:
    """``[start, stop)`` of each consecutive feature part of widths ``parts``; ``[None]`` (all the
    features) when there are not several parts."""
    if parts is None or len(parts) < 2:
        return [None]
    bounds, start = [], 0
    for width in parts:
        bounds.append((start, start + int(width)))
        start += int(width)
    return bounds


def ensemble_head(members: list[nn.Sequential]) -> nn.Sequential:
    """One head whose output averages the probabilities of ``members`` (two or more)."""
    return nn.Sequential(OrderedDict([("members", HeadMembers(members))]))


def head_members(head: nn.Sequential) -> int:
    """How many heads ``head`` averages (1 for a plain head)."""
    members = getattr(head, "members", None)
    return len(members) if isinstance(members, HeadMembers) else 1


def with_temperature(head: nn.Sequential, temperature: float) -> nn.Sequential:
    """``head`` followed by a :class:`LogitTemperature` of ``temperature`` (replacing one it has)."""
    layers = [(name, m) for name, m in head.named_children() if name != "temperature"]
    return nn.Sequential(OrderedDict([*layers, ("temperature", LogitTemperature(temperature))]))


def head_temperature(head: nn.Sequential) -> float | None:
    """The head's calibration temperature, None when it has none."""
    layer = getattr(head, "temperature", None)
    return float(layer.temperature) if isinstance(layer, LogitTemperature) else None


def build_head(kind: str, in_dim: int, n_classes: int, *, hidden: int = 512, dropout: float = 0.5, temperature: bool = False,
               members: int = 1, parts: tuple[int, ...] | list[int] | None = None) -> nn.Sequential:
    """Stable layer names (``norm``, ``fc1``, ``fc2`` / ``fc``, ``temperature``; ``members.K.*`` for an
    ensemble of ``members`` heads) so saved weights map 1:1.

    ``parts``: the widths of a branched backbone's feature parts (summing to ``in_dim``); the
    ``members`` heads are split evenly between them in order, each reading its part only
    (``members.K.features``)."""
    bounds = part_bounds(parts)
    if len(bounds) > 1 and (sum(parts) != in_dim or min(parts) < 1):
        raise ValueError(f"head parts {list(parts)} must be positive widths summing to in_dim {in_dim}")
    if not (isinstance(members, int) and not isinstance(members, bool) and members % len(bounds) == 0
            and 1 <= members // len(bounds) <= MAX_HEADS):
        each = f" for each of {len(bounds)} feature parts" if len(bounds) > 1 else ""
        raise ValueError(f"head members must be an integer from 1 to {MAX_HEADS}{each}, got {members!r}")
    if members > 1:
        head = ensemble_head([build_head(kind, in_dim, n_classes, hidden=hidden, dropout=dropout) if b is None
                              else on_slice(build_head(kind, b[1] - b[0], n_classes, hidden=hidden, dropout=dropout), *b)
                              for b in bounds for _ in range(members // len(bounds))])
        return with_temperature(head, 1.0) if temperature else head
    if n_classes < 2:
        raise ValueError("a classifier needs at least 2 classes")
    if kind == "recipe":
        layers = [
            ("norm", FeatureStandardize(in_dim)),
            ("fc1", nn.Linear(in_dim, hidden)),
            ("relu", nn.ReLU()),
            ("dropout", nn.Dropout(dropout)),
            ("fc2", nn.Linear(hidden, n_classes)),
        ]
    elif kind == "tutorial":
        layers = [
            ("fc1", nn.Linear(in_dim, hidden)),
            ("relu", nn.ReLU()),
            ("dropout", nn.Dropout(dropout)),
            ("fc2", nn.Linear(hidden, n_classes)),
            ("sigmoid", nn.LogSigmoid()),
        ]
    elif kind == "linear":
        layers = [("norm", FeatureStandardize(in_dim)), ("dropout", nn.Dropout(dropout)), ("fc", nn.Linear(in_dim, n_classes))]
    else:
        raise ValueError(f"head must be one of {', '.join(HEAD_KINDS)}, got {kind!r}")
    if temperature:
        layers.append(("temperature", LogitTemperature()))
    return nn.Sequential(OrderedDict(layers))


def head_config(kind: str, in_dim: int, n_classes: int, *, hidden: int = 512, dropout: float = 0.5, temperature: float | None = None,
                members: int = 1, parts: tuple[int, ...] | list[int] | None = None) -> dict:
    """The head's architecture as model.json records it; ``temperature``: the calibration layer that
    ends it (its value, for readers of model.json; the tensor in model.safetensors is what computes);
    ``members``: heads averaged (recorded only for an ensemble, so single-head bundles read as before);
    ``parts``: a branched backbone's feature widths (recorded only when there are several)."""
    cfg = {"kind": kind, "in_dim": in_dim, "n_classes": n_classes, "hidden": hidden, "dropout": dropout}
    if members > 1:
        cfg["members"] = members
    if parts is not None and len(parts) > 1:
        cfg["parts"] = [int(p) for p in parts]
    return {**cfg, "temperature": round(float(temperature), 6)} if temperature is not None else cfg


def head_from_config(cfg: dict) -> nn.Sequential:
    return build_head(cfg["kind"], int(cfg["in_dim"]), int(cfg["n_classes"]), hidden=int(cfg.get("hidden", 512)), dropout=float(cfg.get("dropout", 0.5)),
                      temperature=cfg.get("temperature") is not None, members=cfg.get("members", 1), parts=cfg.get("parts"))
