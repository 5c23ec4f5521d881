"""``model.json`` as one typed object: :class:`ModelMeta`.

Training builds it, the bundle writes and reads it, and every reader (load, export,
predict, serve, report) uses its attributes, so a field is named and checked in one
place instead of being looked up by string key in each module. The file format is
unchanged: :meth:`ModelMeta.to_dict` gives the JSON object written beside the tensors and
:meth:`ModelMeta.from_dict` reads it back, including files written by earlier versions
(optional fields may be missing; keys it does not know are kept and written back).

No torch here: resolving and describing a bundle stays light.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.backbones.specs import Preprocessing
from imgclf.config.settings import MAX_HEADS

BUNDLE_FORMAT = "imgclf-bundle/1"  # a bundle every imgclf version reads
# a head that ends in a calibration temperature (imgclf.model.heads.LogitTemperature): versions
# before it would fail on the extra tensor, so such a bundle says it needs a newer reader
CALIBRATED_BUNDLE_FORMAT = "imgclf-bundle/2"
# several heads averaged (--heads, imgclf.model.heads.HeadMembers, model.json head.members): versions
# before it would build one head and misread the tensors as tampered, so it needs a newer reader too
ENSEMBLE_BUNDLE_FORMAT = "imgclf-bundle/3"
# several backbones side by side (a branched entry, model.json head.parts): heads that read a slice of
# the features; a reader before it would build full-width members and misread the tensors. /5: the
# members' features became their pooled stage outputs (not the conv head's), so a reader of /4 would
# compute features of another width; a /4 bundle is read and then refused by Classifier.load's width check
BRANCHED_BUNDLE_FORMAT = "imgclf-bundle/5"
READABLE_FORMATS = (BUNDLE_FORMAT, CALIBRATED_BUNDLE_FORMAT, ENSEMBLE_BUNDLE_FORMAT, "imgclf-bundle/4", BRANCHED_BUNDLE_FORMAT)
REQUIRED_KEYS = ("format", "backbone", "weights", "preprocessing", "class_names", "head")


class BundleError(ValueError):
    """A model bundle is missing, tampered with or inconsistent."""


# model.json's keys in the order they are written; keys outside this list are kept as extras
FIELD_ORDER = (
    "format", "imgclf_version", "backbone", "weights", "preprocessing", "class_names", "head",
    "frozen_backbone", "backbone_tuned", "recipe", "settings", "train_config",
    "threshold", "threshold_policy", "positive_class", "tta", "seed", "tensors_sha256",
)
OPTIONAL_KEYS = ("neighbors",)  # written after those, only when the model has one (a similar-cases index)


@dataclass(frozen=True)
class ModelMeta:
    """Everything about a trained model except its tensors.

    ``backbone`` is the registry entry's description (``BackboneSpec.describe()``),
    ``weights`` the resolved weights reference (``WeightsRef.to_dict()``), ``head`` the head
    config (``heads.head_config``), ``settings``/``train_config`` the resolved training
    settings; they stay plain dicts because they are recorded as they were when the model
    was trained. Treat them as read-only: the object is shared by everything that loaded it.
    ``threshold`` is a number (P of ``positive_class``, else of the second class), a
    ``{"value", "positive_class"}`` dict, or None for argmax.
    """

    backbone: dict
    weights: dict
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    head: dict
    imgclf_version: str | None = None
    frozen_backbone: bool | None = None
    backbone_tuned: dict | None = None
    recipe: str | None = "fast"
    settings: dict = field(default_factory=dict)
    train_config: dict | None = None
    threshold: float | dict | None = None
    threshold_policy: str | None = None
    positive_class: str | None = None
    tta: str = "none"
    seed: int = 0
    tensors_sha256: str | None = None  # of model.safetensors, set by save_bundle and checked by load_bundle
    neighbors: dict | None = None  # the optional similar-cases index: its files' sha256, count, sizes (imgclf.model.neighbors)
    format: str = BUNDLE_FORMAT
    extra: dict = field(default_factory=dict)  # keys this version does not know, written back as read

    @property
    def backbone_name(self) -> str:
        return self.backbone["name"]

    @property
    def weights_identity(self) -> str | None:
        return self.weights.get("identity")

    def to_dict(self) -> dict:
        """The JSON object of ``model.json``, exactly as reading the file gives it back (lists,
        not tuples), and a fresh copy: callers may change it."""
        values = {
            "format": self.format,
            "imgclf_version": self.imgclf_version,
            "backbone": self.backbone,
            "weights": self.weights,
            "preprocessing": self.preprocessing.to_dict(),
            "class_names": list(self.class_names),
            "head": self.head,
            "frozen_backbone": self.frozen_backbone,
            "backbone_tuned": self.backbone_tuned,
            "recipe": self.recipe,
            "settings": self.settings,
            "train_config": self.train_config,
            "threshold": self.threshold,
            "threshold_policy": self.threshold_policy,
            "positive_class": self.positive_class,
            "tta": self.tta,
            "seed": self.seed,
        }
        if self.tensors_sha256 is not None:  # bundles written before it was recorded have none
            values["tensors_sha256"] = self.tensors_sha256
        if self.neighbors is not None:  # only bundles saved with a similar-cases index have one
            values["neighbors"] = self.neighbors
        return json.loads(json.dumps({**values, **self.extra}))

    @classmethod
    def from_dict(cls, d, source: str = "model.json") -> "ModelMeta":
        """Check and type a parsed ``model.json``; ``source`` names the file in errors.

        Raises :class:`BundleError` (one line) when a required key is missing or a value
        has the wrong type; optional keys an older file lacks take their old defaults.
        """
        if not isinstance(d, dict) or not isinstance(d.get("format"), str) or not d["format"].startswith("imgclf-bundle/"):
            raise BundleError(f"{source}: not an imgclf bundle (no imgclf-bundle format)")
        if d["format"] not in READABLE_FORMATS:
            raise BundleError(f"{source}: format {d['format']} is newer than this imgclf reads ({', '.join(READABLE_FORMATS)}); "
                              "upgrade imgclf to load it")
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise BundleError(f"{source}: missing keys {', '.join(missing)}")

        def problem(text: str) -> BundleError:
            return BundleError(f"{source}: {text}")

        def optional(key: str, types: tuple[type, ...], what: str, default=None):
            value = d.get(key, default)
            if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
                raise problem(f"{key} must be {what} or null, got {value!r}")
            return value

        backbone = d["backbone"]
        if not isinstance(backbone, dict) or not isinstance(backbone.get("name"), str) or not backbone["name"]:
            raise problem("backbone must be an object with a name")
        if not isinstance(d["weights"], dict):
            raise problem(f"weights must be an object, got {d['weights']!r}")
        preprocessing = _preprocessing(d["preprocessing"], problem)
        names = d["class_names"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise problem("class_names must be a non-empty list of names")
        if len(set(names)) != len(names):
            raise problem(f"class_names has duplicates ({', '.join(names)})")
        head = d["head"]
        if not isinstance(head, dict) or not isinstance(head.get("kind"), str) or not _is_int(head.get("in_dim")):
            raise problem("head must be an object with a kind and an integer in_dim")
        if head.get("n_classes") != len(names):
            raise problem(f"class_names lists {len(names)} classes but its head has {head.get('n_classes')}")
        parts = head.get("parts")
        if parts is not None and not (isinstance(parts, list) and len(parts) >= 2 and all(_is_int(p) and p > 0 for p in parts)
                                      and sum(parts) == head["in_dim"] and "members" in head):
            raise problem(f"head parts must be two or more positive widths summing to in_dim {head['in_dim']}, with members, got {parts!r}")
        n_parts = len(parts) if parts else 1
        if "members" in head and not (_is_int(head["members"]) and 2 <= head["members"] <= MAX_HEADS * n_parts and head["members"] % n_parts == 0):
            raise problem(f"head members must be an integer from 2 to {MAX_HEADS * n_parts}"
                          f"{f' shared evenly by {n_parts} parts' if n_parts > 1 else ''}, got {head['members']!r}")
        settings = d.get("settings", {})
        if not isinstance(settings, dict):
            raise problem(f"settings must be an object, got {settings!r}")
        seed = d.get("seed", 0)
        if not _is_int(seed):
            raise problem(f"seed must be an integer, got {seed!r}")
        tta = optional("tta", (str,), "a test-time view preset name")
        return cls(
            backbone=backbone,
            weights=d["weights"],
            preprocessing=preprocessing,
            class_names=tuple(names),
            head=head,
            imgclf_version=optional("imgclf_version", (str,), "a version string"),
            frozen_backbone=optional("frozen_backbone", (bool,), "true or false"),
            backbone_tuned=optional("backbone_tuned", (dict,), "an object") or None,
            recipe=optional("recipe", (str,), "a recipe name", default="fast"),
            settings=settings,
            train_config=optional("train_config", (dict,), "an object"),
            threshold=optional("threshold", (int, float, dict), "a number or an object"),
            threshold_policy=optional("threshold_policy", (str,), "a policy"),
            positive_class=optional("positive_class", (str,), "a class name"),
            tta=tta or "none",
            seed=seed,
            tensors_sha256=optional("tensors_sha256", (str,), "a sha256 hex digest"),
            neighbors=optional("neighbors", (dict,), "an object"),
            format=d["format"],
            extra={k: v for k, v in d.items() if k not in FIELD_ORDER and k not in OPTIONAL_KEYS},
        )


def read_model_meta(path: str | os.PathLike) -> ModelMeta:
    """``model.json`` at ``path``, checked and typed (:class:`BundleError` when it is not one)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({' '.join(str(e).split())})") from None
    return ModelMeta.from_dict(d, source=str(path))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _preprocessing(d, problem) -> Preprocessing:
    if not isinstance(d, dict):
        raise problem(f"preprocessing must be an object, got {d!r}")
    try:
        prep = Preprocessing.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise problem(f"preprocessing is not valid ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not (_is_int(prep.input_size) and _is_int(prep.resize_size) and prep.input_size > 0 and prep.resize_size > 0):
        raise problem(f"preprocessing sizes must be positive integers, got {prep.input_size!r} and {prep.resize_size!r}")
    if len(prep.mean) != 3 or len(prep.std) != 3 or not all(s > 0 for s in prep.std):
        raise problem("preprocessing needs 3 means and 3 positive standard deviations")
    return prep
