"""Image → network input, exactly as the backbone entry's :class:`Preprocessing` says.

Output is uint8 CHW: normalisation happens inside the feature extractor / exported graph,
so every engine (torch, ONNX Runtime, OpenVINO) and every client sees the same pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from imgclf.backbones import Preprocessing

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def resize_and_crop(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize/crop an RGB image to ``prep.input_size`` square by the entry's policy."""
    resample = _RESAMPLE[prep.interpolation]
    size = prep.input_size
    if prep.policy == "squash":
        return img.resize((size, size), resample)
    if prep.policy != "center_crop":
        raise ValueError(f"unknown resize policy {prep.policy!r}")
    w, h = img.size
    short = prep.resize_size
    if w <= h:
        nw, nh = short, max(1, int(round(h * short / w)))
    else:
        nw, nh = max(1, int(round(w * short / h))), short
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), resample)
    left = int(round((nw - size) / 2.0))
    top = int(round((nh - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def image_to_array(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """RGB PIL image → uint8 array (3, S, S) ready for the feature extractor."""
    arr = np.asarray(resize_and_crop(img, prep), dtype=np.uint8)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
