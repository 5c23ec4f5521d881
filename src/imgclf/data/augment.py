"""Image-level augmentation and test-time views, deterministic per image.

Lesion photos have no "up": flips in both directions and 90° rotations are safe, plus a
random resized crop and mild colour jitter. Every random choice is drawn from a generator
seeded by (seed, image content hash, view index), so the K augmented views of an image
(``--feature-views K``) are reproducible and can be cached like plain features.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageEnhance

from imgclf.config import settings as declared
from imgclf.config.settings import AUGMENT_PRESETS



@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = False
    vflip: bool = False
    rot90: bool = False
    crop_scale: float = 1.0  # random resized crop keeps at least this fraction of the area (1.0 = off)
    color_jitter: float = 0.0  # max relative change of brightness/contrast/saturation (0 = off)

    @property
    def active(self) -> bool:
        return self.hflip or self.vflip or self.rot90 or self.crop_scale < 1.0 or self.color_jitter > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def preset(name: str) -> AugmentConfig:
    if name == "none":
        return AugmentConfig()
    if name == "light":
        return AugmentConfig(hflip=True, vflip=True, rot90=True, crop_scale=0.8, color_jitter=0.1)
    if name == "strong":
        return AugmentConfig(hflip=True, vflip=True, rot90=True, crop_scale=0.5, color_jitter=0.25)
    raise ValueError(f"augment must be one of {', '.join(AUGMENT_PRESETS)}, got {name!r}")


def build_augment(name: str = "none", **overrides) -> AugmentConfig:
    """A preset with individual settings overriding it (None = keep the preset's value); the
    values were checked against their declarations (:mod:`imgclf.config.settings`)."""
    cfg = preset(name)
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(cfg, **changes)


def _rng(seed: int, content_hash: str, view: int) -> np.random.Generator:
    h = hashlib.blake2b(f"{seed}:{content_hash}:{view}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(h, "little"))


def augment_image(img: Image.Image, cfg: AugmentConfig, rng: np.random.Generator) -> Image.Image:
    """One random view of ``img`` (RGB PIL) under ``cfg``."""
    if cfg.crop_scale < 1.0:
        w, h = img.size
        area = w * h
        for _ in range(10):
            target = area * rng.uniform(cfg.crop_scale, 1.0)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                img = img.crop((x0, y0, x0 + cw, y0 + ch))
                break
    if cfg.hflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if cfg.vflip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if cfg.rot90:
        k = int(rng.integers(0, 4))
        if k:
            img = img.transpose([None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270][k])
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhancer(img).enhance(float(rng.uniform(1 - j, 1 + j)))
    return img


class AugmentedView:
    """Image transform for view ``view`` of an augmentation config (cache-keyed)."""

    def __init__(self, cfg: AugmentConfig, view: int, seed: int = 0):
        self.cfg, self.view, self.seed = cfg, view, seed
        self.key = f"aug:{cfg.key}:seed={seed}:view={view}"

    def __call__(self, img: Image.Image, content_hash: str) -> Image.Image:
        return augment_image(img, self.cfg, _rng(self.seed, content_hash, self.view))


# ----------------------------------------------------------------------- test-time views
# One table of views: the PIL transpose the feature path applies to a picture and the
# equal op on NCHW tensors that the exported graph applies (torch imported when one runs).


def _same(x):
    return x


def _flip(*dims: int, transpose: bool = False):
    """NCHW flip over ``dims`` (after swapping H and W if ``transpose``); transpose + flip
    rather than torch.rot90, which the ONNX exporter does not support."""

    def op(x):
        import torch

        return torch.flip(x.transpose(2, 3) if transpose else x, dims=list(dims))

    return op


@dataclass(frozen=True)
class TTAView:
    """A test-time view: ``pil_op`` for ``Image.transpose`` (None = unchanged) and the
    ``tensor_op`` doing the same to uint8/float NCHW tensors (ROTATE_90 = counter-clockwise)."""

    name: str
    pil_op: Image.Transpose | None
    tensor_op: Callable


TTA_VIEWS = {
    v.name: v
    for v in (
        TTAView("identity", None, _same),
        TTAView("hflip", Image.Transpose.FLIP_LEFT_RIGHT, _flip(3)),
        TTAView("vflip", Image.Transpose.FLIP_TOP_BOTTOM, _flip(2)),
        TTAView("rot90", Image.Transpose.ROTATE_90, _flip(2, transpose=True)),
        TTAView("rot180", Image.Transpose.ROTATE_180, _flip(2, 3)),
        TTAView("rot270", Image.Transpose.ROTATE_270, _flip(3, transpose=True)),
    )
}
TTA_PRESETS = {"none": ("identity",), "flips": ("identity", "hflip", "vflip", "rot180"), "d4": tuple(TTA_VIEWS)}
assert tuple(TTA_PRESETS) == declared.TTA_PRESETS  # the names the tta setting accepts


class FixedView:
    """A deterministic test-time transform (flip/rotation) of a picture."""

    def __init__(self, name: str):
        if name not in TTA_VIEWS:
            raise ValueError(f"unknown TTA transform {name!r}")
        self.name = name
        self.key = f"tta:{name}"

    def __call__(self, img: Image.Image, content_hash: str) -> Image.Image:
        op = TTA_VIEWS[self.name].pil_op
        return img if op is None else img.transpose(op)


def tta_views(name: str) -> list[FixedView | None]:
    """Views for ``--tta none|flips|d4`` (None = the plain view)."""
    if name not in TTA_PRESETS:
        raise ValueError(f"tta must be one of {', '.join(TTA_PRESETS)}, got {name!r}")
    return [None if n == "identity" else FixedView(n) for n in TTA_PRESETS[name]]
