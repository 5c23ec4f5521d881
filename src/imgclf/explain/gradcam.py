"""Grad-CAM: where in the image did the model look for the class it chose?

Grad-CAM (Selvaraju et al., 2017) weights each channel of the last convolutional stage
by the mean gradient of the class logit with respect to it, sums, and keeps the
positive part. Here the backbone is frozen, so nothing needs gradients except the
feature map itself: the map is computed once without autograd, then a leaf copy with
``requires_grad`` is pushed through the backbone's own pooling and the trained head.
The heatmap is bilinearly upsampled to the model's input crop (the pixels the model
saw, after the entry's resize/crop), so overlays are drawn on that crop.

The backbone is the model's own (fine-tuned blocks included, same preprocessing); the
probability returned is the plain view's, without test-time augmentation.

Works for every backbone whose features come from an NCHW convolutional map (all
registry entries, timm CNNs and conv/attention hybrids); a timm model whose
``forward_features`` is a token sequence (ViT) or channels-last (Swin) raises a
``ValueError`` saying so.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgclf.data.preprocess import image_to_array, resize_and_crop

log = logging.getLogger("imgclf")

__all__ = ["gradcam", "overlay", "model_input_image", "explain_files", "ALPHA"]

ALPHA = 0.45  # heatmap opacity in overlays


def _check_fitted(clf) -> None:
    if not hasattr(clf, "head_") or not hasattr(clf, "class_names_"):
        raise ValueError("Grad-CAM needs a trained model: fit() it or Classifier.load() a run folder")


def _class_index(clf, class_name: str | None) -> int | None:
    if class_name is None:
        return None
    if class_name not in clf.class_names_:
        raise ValueError(f"--class {class_name!r} is not a class of this model (classes: {', '.join(clf.class_names_)})")
    return clf.class_names_.index(class_name)


def _feature_maps(fx, spec, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The maps the pooled features come from (the last conv stage's output; several for a branched
    entry), refusing maps Grad-CAM cannot use."""
    fmt = getattr(getattr(fx.body, "net", None), "output_fmt", "NCHW")
    fmt = str(getattr(fmt, "value", fmt)).upper()  # timm: a str or a Format enum
    with torch.no_grad():
        fmap = fx.feature_map(x)
    maps = fmap if isinstance(fmap, tuple) else (fmap,)
    for m in maps:
        if m.ndim != 4 or fmt != "NCHW":
            raise ValueError(
                f"Grad-CAM needs a convolutional feature map (N, C, H, W); the backbone {spec.name} gives "
                f"{tuple(m.shape)} ({'channels-last' if m.ndim == 4 else 'a token sequence'}), so it cannot be explained this way"
            )
    return maps


def gradcam(clf, image: Image.Image, class_name: str | None = None) -> tuple[np.ndarray, int, float]:
    """Grad-CAM of ``image`` for ``class_name`` (default: the predicted class).

    Returns (heatmap (S, S) in 0..1 at the model's input crop size S, class index,
    the model's probability of that class). An all-zero heatmap means no region
    raised that class's score.
    """
    _check_fitted(clf)
    wanted = _class_index(clf, class_name)
    runner = clf.backbone_runner()
    spec = runner.spec
    fx = runner.torch_module()
    fx.eval()
    head = clf.head_
    head.eval()
    arr = image_to_array(image.convert("RGB"), spec.preprocessing)
    x = torch.from_numpy(arr)[None].float()
    maps = tuple(m.detach().float().requires_grad_(True) for m in _feature_maps(fx, spec, x))
    with torch.enable_grad():
        pooled = fx.pool(maps if len(maps) > 1 else maps[0]).flatten(1)
        logits = head(pooled)
        k = int(logits[0].argmax()) if wanted is None else wanted
        grads = torch.autograd.grad(logits[0, k], maps)
    with torch.no_grad():
        prob = float(torch.softmax(logits.detach().double(), 1)[0, k])
        size = spec.preprocessing.input_size
        weighted = [(g.mean(dim=(2, 3), keepdim=True) * m.detach()).sum(1, keepdim=True) for g, m in zip(grads, maps)]
        if len(weighted) == 1:
            weighted = [torch.relu(weighted[0])]
        # several pooled maps (a branched entry: each backbone's last stages): each weighted map at
        # the input size, summed before the ReLU, as their pooled features add up in the logit
        cam = sum(torch.nn.functional.interpolate(w, size=(size, size), mode="bilinear", align_corners=False) for w in weighted)
        cam = torch.relu(cam)[0, 0]
        peak = float(cam.max())
        heat = (cam / peak).clamp(0, 1) if peak > 0 else torch.zeros_like(cam)
    return heat.numpy().astype(np.float32), k, prob


def model_input_image(clf, image: Image.Image) -> Image.Image:
    """The RGB crop the model sees (the entry's resize/crop), to draw heatmaps on."""
    return resize_and_crop(image.convert("RGB"), clf.backbone_runner().spec.preprocessing)


def _jet(heat: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["jet"](heat)[..., :3] * 255).astype(np.float32)


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = ALPHA) -> Image.Image:
    """Blend a jet-coloured ``heatmap`` over ``image`` (pass the model's input crop, see
    ``model_input_image``; another size is resized to the heatmap's)."""
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0, 1)
    h, w = heat.shape
    img = image.convert("RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BICUBIC)
    base = np.asarray(img, dtype=np.float32)
    out = (1 - alpha) * base + alpha * _jet(heat)
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"


def explain_files(clf, paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike, class_name: str | None = None) -> list[Path]:
    """One overlay PNG per readable image in ``out_dir`` (``<stem>_gradcam_<class>.png``).

    Unreadable files are logged and skipped; a ValueError if none could be explained.
    """
    from imgclf.fileio import atomic_write_bytes
    from imgclf.data.imaging import ImageDecodeError, load_rgb

    _check_fitted(clf)
    _class_index(clf, class_name)  # fail before any work
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    written: list[Path] = []
    taken: set[str] = set()
    errors: list[str] = []
    for p in paths:
        try:
            img = load_rgb(p)
        except ImageDecodeError as e:
            log.warning("skipped %s", e)
            errors.append(str(e))
            continue
        heat, k, prob = gradcam(clf, img, class_name)
        cls = clf.class_names_[k]
        stem = f"{_safe(Path(p).stem)}_gradcam_{_safe(cls)}"
        name, i = f"{stem}.png", 2
        while name in taken:
            name, i = f"{stem}-{i}.png", i + 1
        taken.add(name)
        buf = io.BytesIO()
        overlay(model_input_image(clf, img), heat).save(buf, format="PNG")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / name, buf.getvalue())
        log.info("%s: %s (p=%.3f) -> %s", p, cls, prob, out / name)
        written.append(out / name)
    if not written:
        raise ValueError("no image could be explained: " + ("; ".join(errors) if errors else "no images given"))
    return written
