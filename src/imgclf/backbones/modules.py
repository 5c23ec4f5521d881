"""Builds a registry entry into a frozen PyTorch feature extractor (raw pixels in, pooled
features out), the one expensive step every engine, export and fine-tune starts from."""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from imgclf.backbones.specs import BackboneSpec, Preprocessing, WeightsRef
from imgclf.backbones.weights import WeightsUnavailableError, load_into, read_state_dict, resolve_weights


class FeatureExtractor(nn.Module):
    """uint8/float RGB batch (N,3,H,W) in 0..255 → pooled feature vectors (N, D).

    Normalisation lives here so exported graphs take raw pixels. ``feature_map`` is the
    last convolutional stage (for Grad-CAM and partial fine-tuning); for an entry that pools
    several stages (``LiteStageMaps``) or several backbones (``BranchBodies``), a tuple of the
    maps its pooled features come from.
    """

    def __init__(self, body: nn.Module, pool: Callable[[torch.Tensor], torch.Tensor] | nn.Module, prep: Preprocessing):
        super().__init__()
        self.body = body
        self.pool = pool if isinstance(pool, nn.Module) else _Lambda(pool)
        self.register_buffer("pixel_mean", torch.tensor(prep.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(prep.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(x)).flatten(1)


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class GlobalMaxPool(nn.Module):
    def forward(self, x):
        return torch.amax(x, dim=(2, 3))


class GlobalAvgPool(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


class _NetCall(nn.Module):
    """``net.<method>(x, **kwargs)`` as a module; ``net`` stays the submodule ``net``."""

    def __init__(self, net, method: str, **kwargs):
        super().__init__()
        self.net = net
        self.method, self.kwargs = method, kwargs

    def forward(self, x):
        return getattr(self.net, self.method)(x, **self.kwargs)


class _ConvNextPool(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x.mean(dim=(2, 3), keepdim=True))


def lite_stage_ends(net: nn.Module) -> list[int]:
    """Index of the last block of each stage of an EfficientNet-Lite network, in order: the first
    block of each stage keeps the decoder's list-valued stride (the others an int)."""
    blocks = list(net._blocks)
    return [i for i in range(len(blocks)) if i == len(blocks) - 1 or isinstance(blocks[i + 1]._block_args.stride, (list, tuple))]


class LiteStageMaps(nn.Module):
    """An EfficientNet-Lite's stem and blocks, returning the outputs of its last ``count``
    stages as a tuple of maps (the conv head is not run).

    Why: pooled, those mid-level maps carried more of what separates dermoscopy classes than
    the conv head's 1,280 ImageNet-tuned channels did, in cross-validation (benchmarks/README.md,
    "Stage outputs instead of the conv head").
    """

    def __init__(self, net: nn.Module, count: int):
        super().__init__()
        self.net = net
        self.taps = tuple(lite_stage_ends(net)[-count:])

    def forward(self, x):
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        rate, n = net._global_params.drop_connect_rate or 0.0, len(net._blocks)
        maps = []
        for i, block in enumerate(net._blocks):
            x = block(x, drop_connect_rate=rate * i / n)  # as extract_features (inactive in eval)
            if i in self.taps:
                maps.append(x)
        return tuple(maps)


class MapsAvgPool(nn.Module):
    """Each map of a tuple average-pooled, the pooled vectors side by side."""

    def forward(self, maps):
        return torch.cat([m.mean(dim=(2, 3)) for m in maps], 1)


class BranchBodies(nn.Module):
    """Several backbone bodies on one normalised image, each at its own input size (bilinear
    resize inside the network, so one crop of the largest size feeds all): every body's maps,
    in order, as one flat tuple."""

    def __init__(self, bodies: list[nn.Module], sizes: list[int], input_size: int):
        super().__init__()
        self.bodies = nn.ModuleList(bodies)
        self.sizes = tuple(None if s == input_size else s for s in sizes)  # None: takes the crop as it is

    def forward(self, x):
        maps = []
        for body, size in zip(self.bodies, self.sizes):
            out = body(x if size is None else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False))
            maps.extend(out if isinstance(out, tuple) else (out,))
        return tuple(maps)


def build_feature_extractor(spec: BackboneSpec, ref: WeightsRef, *, seed: int = 0) -> FeatureExtractor:
    """Build the frozen feature extractor and load its weights (the expensive step)."""
    prep = spec.preprocessing
    if ref.kind == "none":
        torch.manual_seed(seed)

    if spec.family == "branched":
        parts = [build_feature_extractor(b, resolve_weights(b, "none" if ref.kind == "none" else "imagenet", seed=seed + i), seed=seed + i)
                 for i, b in enumerate(spec.branches)]
        body = BranchBodies([p.body for p in parts], [b.preprocessing.input_size for b in spec.branches], prep.input_size)
        fx = FeatureExtractor(body, MapsAvgPool(), prep)

    elif spec.family == "efficientnet_lite":
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(spec.arch)
        if ref.path:
            load_into(net, read_state_dict(ref.path), ignore_prefixes=("_fc.",), source=ref.description)
        net._fc = nn.Identity()
        if spec.extra.get("stages"):
            fx = FeatureExtractor(LiteStageMaps(net, spec.extra["stages"]), MapsAvgPool(), prep)
        else:
            fx = FeatureExtractor(_NetCall(net, "extract_features"), GlobalAvgPool(), prep)

    elif spec.family == "torchvision":
        import torchvision

        net = torchvision.models.get_model(spec.arch, weights=None)
        if ref.kind == "hub":
            try:
                sd = torch.hub.load_state_dict_from_url(spec.extra["url"], map_location="cpu", check_hash=True, weights_only=True)
            except Exception as e:
                raise WeightsUnavailableError(
                    f"{spec.name}: download of {spec.extra['url']} failed ({e}); pass --weights PATH"
                ) from None
            load_into(net, sd, ignore_prefixes=(), source=ref.description)
        elif ref.path:
            load_into(net, read_state_dict(ref.path), ignore_prefixes=_tv_head_prefixes(spec.arch), source=ref.description)
        if spec.arch == "resnet50":
            body = nn.Sequential(*(m for n, m in net.named_children() if n not in ("avgpool", "fc")))
            pool = GlobalAvgPool()
        elif spec.arch == "convnext_tiny":
            body, pool = net.features, _ConvNextPool(net.classifier[0])
        else:
            body = net.features
            pool = GlobalMaxPool() if spec.pooling == "max" else GlobalAvgPool()
        fx = FeatureExtractor(body, pool, prep)

    elif spec.family == "timm":
        import timm

        try:
            net = timm.create_model(spec.arch, pretrained=ref.kind == "hub", num_classes=0)
        except Exception as e:
            if ref.kind != "hub":
                raise
            raise WeightsUnavailableError(f"{spec.name}: download failed ({str(e).splitlines()[0]}); pass --weights PATH") from None
        if ref.path:
            load_into(net, read_state_dict(ref.path), ignore_prefixes=_timm_head_prefixes(net), source=ref.description)
        # the pool is a plain callable so ``net`` is registered once (under ``body``)
        fx = FeatureExtractor(_NetCall(net, "forward_features"), functools.partial(net.forward_head, pre_logits=True), prep)
    else:
        raise AssertionError(spec.family)

    fx.eval()
    for p in fx.parameters():
        p.requires_grad_(False)
    return fx


def _tv_head_prefixes(arch: str) -> tuple[str, ...]:
    # classifier tensors a full-model checkpoint carries and the feature extractor ignores
    return {
        "vgg16": ("classifier.",),
        "resnet50": ("fc.",),
        "efficientnet_b0": ("classifier.",),
        "mobilenet_v3_large": ("classifier.",),
        "convnext_tiny": ("classifier.2.",),
    }[arch]


def _timm_head_prefixes(net) -> tuple[str, ...]:
    name = net.pretrained_cfg.get("classifier", "head") if getattr(net, "pretrained_cfg", None) else "head"
    names = name if isinstance(name, (list, tuple)) else [name]
    return tuple(f"{n}." for n in names)
