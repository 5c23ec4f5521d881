"""Model bundle: ``model.safetensors`` (tensors) + ``model.json`` (everything else).

No pickle anywhere: safetensors holds the head's tensors, JSON holds the backbone entry,
weights identity, preprocessing, class names and head config — all that predict needs,
so predict prepares pixels exactly as training did. Both files are written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from imgclf.config import layout
from imgclf.fileio import atomic_write_bytes

BUNDLE_FORMAT = "imgclf-bundle/1"
if TYPE_CHECKING:  # torch is imported where tensors are handled, so resolving a bundle stays light
    import torch

REQUIRED_KEYS = ("format", "backbone", "weights", "preprocessing", "class_names", "head")


class BundleError(ValueError):
    """A model bundle is missing, tampered with or inconsistent."""


def resolve_bundle_dir(path: str | os.PathLike) -> Path:
    """Accept a run folder, a folder holding model.json, or model.json / model.safetensors."""
    p = Path(path)
    if p.is_file() and p.name in (layout.MODEL_META, layout.MODEL_TENSORS):
        p = p.parent
    if not (p / layout.MODEL_META).is_file():
        raise BundleError(f"{path}: no model.json here (give a run folder or a model.json path)")
    if not (p / layout.MODEL_TENSORS).is_file():
        raise BundleError(f"{p}: model.safetensors is missing beside model.json")
    return p


def save_bundle(directory: str | os.PathLike, head: torch.nn.Module, meta: dict, backbone_tensors: dict | None = None) -> Path:
    """Head tensors as ``head.*``; fine-tuned backbone tensors (if any) as ``backbone.*``."""
    from safetensors.torch import save

    directory = Path(directory)
    tensors = {f"head.{k}": v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    for k, v in (backbone_tensors or {}).items():
        tensors[f"backbone.{k}"] = v.detach().contiguous().cpu()
    meta = {"format": BUNDLE_FORMAT, **meta}
    atomic_write_bytes(directory / layout.MODEL_TENSORS, save(tensors, metadata={"format": BUNDLE_FORMAT}))
    atomic_write_bytes(directory / layout.MODEL_META, (json.dumps(meta, indent=2, sort_keys=False) + "\n").encode())
    return directory


def load_bundle(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return (meta, head tensors, fine-tuned backbone tensors) after checking the files agree."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = resolve_bundle_dir(path)
    try:
        meta = json.loads((d / layout.MODEL_META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{d / 'model.json'}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{d / 'model.json'}: not an {BUNDLE_FORMAT} file")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise BundleError(f"{d / 'model.json'}: missing keys {', '.join(missing)}")
    try:
        tensors = load_file(str(d / layout.MODEL_TENSORS))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{d / 'model.safetensors'}: unreadable ({e})") from None
    head = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
    backbone = {k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")}
    n = len(meta["class_names"])
    if int(meta["head"].get("n_classes", -1)) != n:
        raise BundleError(f"{d}: model.json lists {n} classes but its head has {meta['head'].get('n_classes')}")
    return meta, head, backbone
