"""Synthetic two-class skin-lesion photo set for ``imgclf demo``.

Why synthetic: the demo must run offline, in seconds, with no licensing
questions, yet exercise the real pipeline (folder of labelled photos ->
transfer-learned classifier -> test accuracy).  The images are therefore
drawn to mimic dermoscopy-like photos loosely (skin background, lighting,
hairs, blur) and the two classes follow the textbook "ABCD" cues:

* benign    - roughly round, symmetric, ONE brown colour, smooth border, smaller;
* malignant - asymmetric, jagged border, several colours, larger.

Sizes overlap, the malignant cues vary in strength (a per-image "severity",
skewed towards mild cases) and 15 % of benign lesions are atypical (drawn like a
mild malignant one), so no single cue separates the classes perfectly: the task
is learnable but not trivial (the test accuracy the recipes reach on it is in
benchmarks/README.md).

Everything is numpy-vectorised + Pillow; each image's random generator is
seeded from ``(seed, split, class, index)`` so the same seed gives
byte-identical files regardless of the order or number of images rendered.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["DEMO_MARKER", "SPLITS", "CLASSES", "make_lesion_dataset", "render_lesion"]

DEMO_MARKER = ".imgclf-demo"
"""File written at the set's root so we can recognise (and safely re-use) our own folder."""

SPLITS = ("train", "validation", "test")
CLASSES = ("benign", "malignant")

# Bump whenever rendering changes, so a cached set made by older code is not re-used.
_GENERATOR_VERSION = 2
_JPEG_QUALITY = 92

# Skin tones from very light to very dark (RGB); a tone is interpolated along this ramp.
_SKIN_RAMP = np.array(
    [
        (248, 226, 210),
        (236, 202, 176),
        (212, 166, 130),
        (176, 124, 88),
        (130, 88, 62),
        (88, 58, 42),
    ],
    dtype=np.float32,
)
# Benign lesion brown, light -> dark.
_BROWN_LIGHT = np.array((165, 112, 74), dtype=np.float32)
_BROWN_DARK = np.array((98, 62, 40), dtype=np.float32)
# Extra malignant colours and how likely each is to appear.
_MALIGNANT_EXTRA = np.array(
    [
        (72, 42, 26),  # dark brown
        (32, 26, 24),  # black
        (108, 116, 134),  # blue-grey
        (162, 78, 68),  # red
    ],
    dtype=np.float32,
)
_MALIGNANT_EXTRA_P = np.array([0.32, 0.28, 0.2, 0.2])
_LUMA = np.array((0.299, 0.587, 0.114), dtype=np.float32)


# --------------------------------------------------------------------------- rendering


def _lowfreq(rng: np.random.Generator, size: int, grid: int) -> np.ndarray:
    """Smooth random field (about unit variance) made by bicubic upsampling of a tiny grid.

    Cheap way to get lighting, blotches and colour patches without an FFT.
    """
    small = rng.standard_normal((grid, grid)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC))


def _border_radius(
    rng: np.random.Generator, malignant: bool, severity: float, n_angles: int = 720
) -> np.ndarray:
    """Relative border radius r(theta)/R sampled at ``n_angles`` angles over [-pi, pi).

    A sum of random harmonics: benign gets only a weak 2nd harmonic (an oval,
    which stays symmetric) and a trace of 3rd/4th; malignant gets low odd
    harmonics (asymmetry), mid harmonics (lobes) and many high ones (jagged
    edge), scaled by ``severity``.
    """
    theta = np.linspace(-np.pi, np.pi, n_angles, endpoint=False)
    if malignant:
        ks = np.arange(1, 31)
        amp = np.empty(ks.size)
        amp[:3] = rng.uniform(0.03, 0.16, 3)  # asymmetry / lopsidedness
        amp[3:8] = rng.uniform(0.0, 0.08, 5)  # lobes
        amp[8:] = rng.uniform(0.0, 1.0, ks.size - 8) * 0.045 * (9.0 / ks[8:])  # jagged edge
        amp *= severity
    else:
        ks = np.arange(2, 5)
        amp = np.array([rng.uniform(0.0, 0.09), rng.uniform(0.0, 0.02), rng.uniform(0.0, 0.015)])
    phase = rng.uniform(0, 2 * np.pi, ks.size)
    r = 1.0 + (amp[:, None] * np.cos(ks[:, None] * theta[None, :] + phase[:, None])).sum(axis=0)
    return np.clip(r, 0.35, None)


def _hair_mask(rng: np.random.Generator, size: int) -> np.ndarray | None:
    """Soft mask (0..1) of 0-6 dark curved strokes, or None when the image gets no hair."""
    n_hairs = 0 if rng.random() < 0.4 else int(rng.integers(1, 7))
    if n_hairs == 0:
        return None
    # Draw at 2x and downsample: cheap anti-aliasing so hairs are not pixel staircases.
    big = 2 * size
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    t = np.linspace(0.0, 1.0, 40)[:, None]
    for _ in range(n_hairs):
        p0 = rng.uniform(-0.1, 1.1, 2) * big
        ang = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.3, 0.9) * big
        p2 = p0 + length * np.array([np.cos(ang), np.sin(ang)])
        normal = np.array([-np.sin(ang), np.cos(ang)])
        p1 = (p0 + p2) / 2 + normal * rng.uniform(-0.35, 0.35) * length  # curvature
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # quadratic Bezier
        width = int(rng.integers(2, 5))
        draw.line([tuple(p) for p in pts.tolist()], fill=int(rng.integers(170, 256)), width=width, joint="curve")
    mask = mask.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(mask, dtype=np.float32) / 255.0


def _render(rng: np.random.Generator, malignant: bool, image_size: int) -> tuple[Image.Image, float]:
    """Render one image; also return the true lesion area as a fraction of the image.

    The area is returned so tests can check that size alone does not give the class away.
    """
    s = int(image_size)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)

    # --- skin: tone anywhere on the light->dark ramp, slight hue jitter
    pos = rng.uniform(0, len(_SKIN_RAMP) - 1)
    i = min(int(pos), len(_SKIN_RAMP) - 2)
    skin = _SKIN_RAMP[i] + (pos - i) * (_SKIN_RAMP[i + 1] - _SKIN_RAMP[i])
    skin = skin * rng.uniform(0.96, 1.04, 3).astype(np.float32)
    skin_luma = float(skin @ _LUMA)

    # --- lighting: directional gradient + vignette + soft blotches (multiplicative)
    ang = rng.uniform(0, 2 * np.pi)
    c = (s - 1) / 2.0
    grad = rng.uniform(0.0, 0.25) * ((xx - c) * np.cos(ang) + (yy - c) * np.sin(ang)) / s
    vignette = rng.uniform(0.0, 0.35) * ((xx - c) ** 2 + (yy - c) ** 2) / (s * s)
    shade = 1.0 + grad - vignette + rng.uniform(0.02, 0.06) * _lowfreq(rng, s, 3)
    img = np.empty((s, s, 3), dtype=np.float32)
    img[:] = skin
    redness = rng.uniform(0.0, 6.0) * _lowfreq(rng, s, 5)
    img[..., 0] += redness
    img[..., 1:] -= 0.4 * redness[..., None]

    # --- lesion geometry: polar radius function around a jittered centre
    # Overlap on purpose: many malignant lesions are mild (severity skewed low) and some
    # benign ones (15 %) are atypical (drawn like a mild malignant lesion), so a good
    # model still makes some mistakes and the evidence is informative.
    atypical = (not malignant) and rng.random() < 0.15
    looks_malignant = malignant or atypical
    if malignant:
        severity = float(rng.uniform(0.05, 1.0) ** 1.2)
    else:
        severity = float(rng.uniform(0.05, 0.25)) if atypical else 0.0
    lo, hi = (0.18, 0.32) if malignant else (0.12, 0.22)
    radius = rng.uniform(lo, hi) * s
    cx, cy = c + np.clip(rng.normal(0, 0.04 * s, 2), -0.08 * s, 0.08 * s)
    dx, dy = xx - cx, yy - cy
    dist = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    r_rel = _border_radius(rng, looks_malignant, severity)
    angles = np.linspace(-np.pi, np.pi, r_rel.size, endpoint=False)
    r_theta = radius * np.interp(theta, angles, r_rel, period=2 * np.pi)
    edge = rng.uniform(1.0, 2.5) if looks_malignant else rng.uniform(1.5, 3.5)  # px of soft edge
    alpha = np.clip((r_theta - dist) / edge + 0.5, 0.0, 1.0)
    area = float(alpha.sum()) / (s * s)

    # --- lesion colour, darkened to stay visible on darker skin
    base = _BROWN_LIGHT + rng.uniform() * (_BROWN_DARK - _BROWN_LIGHT)
    scale = min(1.0, 0.8 * skin_luma / float(base @ _LUMA))
    if looks_malignant:
        n_extra = int(np.clip(round(1 + 3 * severity + rng.normal(0, 0.5)), 1, 4))
        extra = rng.choice(len(_MALIGNANT_EXTRA), n_extra, replace=False, p=_MALIGNANT_EXTRA_P)
        colours = np.vstack([base[None], _MALIGNANT_EXTRA[extra]]) * scale  # (k, 3)
        fields = np.stack([_lowfreq(rng, s, int(rng.integers(4, 8))) for _ in range(len(colours))])
        fields[0] += 1.6 * (1.0 - severity)  # weak cases are mostly the base brown
        fields *= 4.0  # sharpness of patch borders
        fields -= fields.max(axis=0, keepdims=True)
        w = np.exp(fields)
        w /= w.sum(axis=0, keepdims=True)
        lesion = np.einsum("kyx,kc->yxc", w, colours)
        opacity = rng.uniform(0.88, 1.0)
    else:
        lesion = np.broadcast_to(base * scale, (s, s, 3))
        opacity = rng.uniform(0.75, 0.95)
    lesion = lesion * (1.0 + 0.04 * _lowfreq(rng, s, 6))[..., None]  # faint texture
    a = (alpha * opacity)[..., None]
    img = img * (1.0 - a) + lesion * a
    img *= shade[..., None]  # the lighting falls on the lesion too

    # --- hairs
    hair = _hair_mask(rng, s)
    if hair is not None:
        hair_col = rng.uniform(20, 60) * np.array((1.0, 0.8, 0.7), dtype=np.float32)
        h = hair[..., None] * rng.uniform(0.75, 1.0)
        img = img * (1.0 - h) + hair_col * h

    # --- fine sensor noise, then brightness/contrast jitter
    img += rng.normal(0.0, rng.uniform(1.5, 5.0), (s, s, 3)).astype(np.float32)
    mean = float(img.mean())
    img = (img - mean) * rng.uniform(0.85, 1.15) + mean * rng.uniform(0.88, 1.12)
    out = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")

    # --- out-of-focus photos
    if rng.random() < 0.45:
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.6))))
    return out, area


def render_lesion(rng: np.random.Generator, malignant: bool, image_size: int = 224) -> Image.Image:
    """Render one synthetic skin-lesion photo (RGB, ``image_size`` square).

    All randomness comes from ``rng`` so a seeded generator gives an identical image.
    """
    return _render(rng, bool(malignant), image_size)[0]


# --------------------------------------------------------------------------- the data set


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _is_complete(root: Path, params: dict) -> bool:
    """Cheap check that a marked set still holds the expected number of images."""
    for split in SPLITS:
        for cls in CLASSES:
            d = root / split / cls
            try:
                n = sum(1 for name in os.listdir(d) if name.endswith(".jpg"))
            except OSError:
                return False
            if n != params[f"n_{split}"]:
                return False
    return True


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / DEMO_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def make_lesion_dataset(
    out_dir: str | os.PathLike,
    *,
    n_train: int = 40,
    n_validation: int = 15,
    n_test: int = 20,
    image_size: int = 224,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the demo set to ``out_dir/{train,validation,test}/{benign,malignant}/*.jpg``.

    ``n_*`` are images per class per split.  Safety rules (the demo may be
    pointed at any path a user types):

    * a non-empty folder without our marker is refused (ValueError) and left untouched;
    * a marked folder made with the same parameters is re-used as is unless ``overwrite``;
    * otherwise the set is built in a temporary sibling folder and renamed into place,
      so a crash never leaves a half-written set; an old demo set is removed only after
      the new one is complete.

    Returns the path of the set.
    """
    params = {
        "generator_version": _GENERATOR_VERSION,
        "n_train": _check_int("n_train", n_train, 1),
        "n_validation": _check_int("n_validation", n_validation, 1),
        "n_test": _check_int("n_test", n_test, 1),
        "image_size": _check_int("image_size", image_size, 32),
        "seed": _check_int("seed", seed, 0),
    }
    out = Path(out_dir)

    existing = False  # does out hold something we must move aside at the end?
    if out.is_symlink() or out.exists():
        if not out.is_dir():
            raise ValueError(f"refusing to write the imgclf demo set to {out}: it exists and is not a folder")
        if any(out.iterdir()):
            if not (out / DEMO_MARKER).is_file():
                raise ValueError(
                    f"refusing to write into {out}: it is not empty and is not an imgclf demo set "
                    f"(no {DEMO_MARKER} marker); choose another folder or empty it"
                )
            if not overwrite and _read_marker(out) == params and _is_complete(out, params):
                return out
            existing = True
        else:
            out.rmdir()  # empty: nothing to preserve, and rename onto it is not portable

    out.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would end up on the finished set.
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for si, split in enumerate(SPLITS):
            for ci, cls in enumerate(CLASSES):
                d = tmp / split / cls
                d.mkdir(parents=True)
                for idx in range(params[f"n_{split}"]):
                    rng = np.random.default_rng([params["seed"], si, ci, idx])
                    img, _ = _render(rng, ci == 1, params["image_size"])
                    img.save(d / f"{cls}_{idx + 1:04d}.jpg", "JPEG", quality=_JPEG_QUALITY)
        # The marker goes last: its presence means the set is complete.
        (tmp / DEMO_MARKER).write_text(json.dumps(params, sort_keys=True, indent=2) + "\n", encoding="utf-8")

        if existing:
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(trash, out)  # put the old set back
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
