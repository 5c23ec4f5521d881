"""Image → network input, exactly as the backbone entry's :class:`Preprocessing` says.

Output is uint8 CHW: normalisation happens inside the feature extractor / exported graph,
so every engine (torch, ONNX Runtime, OpenVINO) and every client sees the same pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from imgclf.data.imaging import ImageDecodeError, load_rgb

if TYPE_CHECKING:  # keep this module torch-free for ONNX-only clients
    from imgclf.backbones.specs import Preprocessing

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


def decoded_batches(items: Sequence, decode: Callable, batch_size: int, pool: ThreadPoolExecutor, ahead: int = 2):
    """Yield (items, uint8 batch or None, {item: error}) per batch, decoding ``ahead`` batches early.

    ``decode(item) -> (array | None, error | None)`` runs in ``pool`` while the caller
    runs inference on the current batch: decoding overlaps compute.
    """
    batches = [list(items[k:k + batch_size]) for k in range(0, len(items), batch_size)]
    futures = [[pool.submit(decode, i) for i in b] for b in batches[:ahead]]
    for bi, b in enumerate(batches):
        if bi + ahead < len(batches):
            futures.append([pool.submit(decode, i) for i in batches[bi + ahead]])
        arrays, idx, errors = [], [], {}
        for i, fut in zip(b, futures[bi]):
            arr, err = fut.result()
            if err:
                errors[i] = err
            else:
                arrays.append(arr)
                idx.append(i)
        futures[bi] = None
        yield idx, (np.stack(arrays) if arrays else None), errors


def draft_size(prep) -> int:
    """JPEG draft size for ``prep``: libjpeg may decode a large JPEG at a reduced scale
    no smaller than this, twice the resize target, so resizing still has pixels to spare.
    Every path that decodes for the model (features, fine-tuning, predict, export, serve)
    uses it, so one file gives the same pixels everywhere."""
    return 2 * prep.resize_size


def decode_array(path: str, prep, transform=None, content_hash: str = "") -> tuple[np.ndarray | None, str | None]:
    """File → (uint8 (3, S, S), None) or (None, one-line error): bad files never raise.

    ``transform`` (an augmented or test-time view) is applied to the decoded image before
    preprocessing; only the plain view uses JPEG draft decoding (a random crop may zoom in).
    """
    try:
        img = load_rgb(path, draft_size=draft_size(prep) if transform is None else None)
        if transform is not None:
            img = transform(img, content_hash)
        return image_to_array(img, prep), None
    except ImageDecodeError as e:
        return None, str(e)
    except Exception as e:  # never let one file kill the run
        return None, f"{path}: {type(e).__name__}: {e}".splitlines()[0]
