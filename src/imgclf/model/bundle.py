"""Model bundle: ``model.safetensors`` (tensors) + ``model.json`` (everything else).

No pickle anywhere: safetensors holds the head's tensors, JSON holds the backbone entry,
weights identity, preprocessing, class names and head config (read and written as one
:class:`~imgclf.model.metadata.ModelMeta`) — all that predict needs, so predict prepares
pixels exactly as training did. Both files are written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from imgclf.config import layout
from imgclf.fileio import atomic_write_bytes, file_sha256
from imgclf.model.metadata import BRANCHED_BUNDLE_FORMAT, BUNDLE_FORMAT, CALIBRATED_BUNDLE_FORMAT, ENSEMBLE_BUNDLE_FORMAT, BundleError, ModelMeta, read_model_meta
from imgclf.model.run_status import check_usable

if TYPE_CHECKING:  # torch is imported where tensors are handled, so resolving a bundle stays light
    import torch

    from imgclf.model.neighbors import NeighborIndex

__all__ = ["BUNDLE_FORMAT", "BundleError", "ModelMeta", "load_bundle", "resolve_bundle_dir", "save_bundle"]


def resolve_bundle_dir(path: str | os.PathLike) -> Path:
    """Accept a run folder, a folder holding model.json, or model.json / model.safetensors."""
    p = Path(path)
    if p.is_file() and p.name in (layout.MODEL_META, layout.MODEL_TENSORS):
        p = p.parent
    if not (p / layout.MODEL_META).is_file():
        raise BundleError(f"{path}: no model.json here (give a run folder or a model.json path)")
    if not (p / layout.MODEL_TENSORS).is_file():
        raise BundleError(f"{p}: model.safetensors is missing beside model.json")
    check_usable(p)
    return p


def save_bundle(directory: str | os.PathLike, head: torch.nn.Module, meta: ModelMeta, backbone_tensors: dict | None = None,
                neighbors: NeighborIndex | None = None) -> Path:
    """Head tensors as ``head.*``; fine-tuned backbone tensors (if any) as ``backbone.*``; ``meta`` as model.json;
    the similar-cases index (if any) as its own files, their sha256 in model.json (a previous one is removed)."""
    from safetensors.torch import save

    directory = Path(directory)
    tensors = {f"head.{k}": v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    for k, v in (backbone_tensors or {}).items():
        tensors[f"backbone.{k}"] = v.detach().contiguous().cpu()
    # a calibrated head, or several heads, have tensors older readers do not expect: the bundle says it needs a newer reader
    if meta.head.get("parts"):
        fmt = BRANCHED_BUNDLE_FORMAT
    elif any(k.startswith("head.members.") for k in tensors):
        fmt = ENSEMBLE_BUNDLE_FORMAT
    elif any(k.startswith("head.") and k.endswith(".temperature") for k in tensors):
        fmt = CALIBRATED_BUNDLE_FORMAT
    else:
        fmt = BUNDLE_FORMAT
    data = save(tensors, metadata={"format": fmt})
    if neighbors is None:
        from imgclf.model.neighbors import remove_index_files

        remove_index_files(directory)
    meta = dataclasses.replace(meta, format=fmt, tensors_sha256=hashlib.sha256(data).hexdigest(), neighbors=neighbors.save(directory) if neighbors is not None else None)
    atomic_write_bytes(directory / layout.MODEL_TENSORS, data)
    atomic_write_bytes(directory / layout.MODEL_META, (json.dumps(meta.to_dict(), indent=2, sort_keys=False) + "\n").encode())
    return directory


def load_bundle(path: str | os.PathLike) -> tuple[ModelMeta, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return (metadata, head tensors, fine-tuned backbone tensors) after checking the files agree."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = resolve_bundle_dir(path)
    meta = read_model_meta(d / layout.MODEL_META)
    tensors_path = d / layout.MODEL_TENSORS
    if meta.tensors_sha256 is not None and file_sha256(tensors_path) != meta.tensors_sha256:
        raise BundleError(f"{tensors_path}: its sha256 differs from the one in model.json (the file was damaged or modified); refusing to load")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BundleError(f"{tensors_path}: unreadable ({e})") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise BundleError(f"{tensors_path}: {len(bad)} tensor(s) hold NaN or infinite values (e.g. {bad[0]}); refusing to load")
    head = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
    backbone = {k[9:]: v for k, v in tensors.items() if k.startswith("backbone.")}
    return meta, head, backbone
