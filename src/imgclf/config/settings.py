"""Every training and runtime setting, declared once: type, default, allowed values, one-line help.

The recipes (:mod:`imgclf.config.recipes`) are overrides of these defaults; the CLI's flags
are generated from the declarations (:mod:`imgclf.config.cli_args`); a run's ``config.json``
holds the resolved object and loading a run restores it. A new setting is one more field
here. Nothing in this module imports torch, so ``imgclf --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from imgclf.config.names import DEFAULT_BACKBONE, is_frozen_only

HEAD_KINDS = ("recipe", "linear", "tutorial")
MAX_HEADS = 16  # --heads: each head costs one stage-1 fit and one head pass per prediction
CLASS_WEIGHTS = ("auto", "balanced", "none")
LOSSES = ("ce", "focal")
SAMPLERS = ("shuffle", "balanced")
CHECKPOINTS = ("best", "last")
INPUT_SCALINGS = ("entry", "x/255")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")
MONITORS = ("val_loss", "val_accuracy", "val_calibrated_loss")
TAIL_BN_MODES = ("frozen", "train")
AUGMENT_PRESETS = ("none", "light", "strong")
TTA_PRESETS = ("none", "flips", "d4")
TTA_CHOICES = ("auto", *TTA_PRESETS)  # training: auto = one preset chosen on validation and stored
TTA_AUTO_CANDIDATES = TTA_PRESETS  # what tta auto chooses among, cheapest first (each view set contains the one before)
TTA_AUTO_MARGIN = 0.005  # validation log loss (nats) a costlier preset must gain to be chosen
CALIBRATIONS = ("temperature", "none")
ENGINES = ("auto", "openvino", "onnxruntime", "torch")
PRECISIONS = ("auto", "fp32", "bf16")
RECIPE_NAMES = ("seed", "fast", "finetune", "ensemble")


class SettingError(ValueError):
    """A setting with a wrong name, type or value; the message names the setting."""


def setting(default: Any, help: str, *, choices: tuple | None = None, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, group: str = "training", check=None, cli: bool = True, flag: str | None = None):
    """A dataclass field carrying its declaration: allowed values and one line of help.

    ``check(value)`` returns an error text (or None) for rules the bounds cannot say;
    ``cli=False`` keeps a setting out of the generated flags (recipe-only values);
    ``flag`` names the flag when it is not the field's name (``--flag``/``--no-flag``).
    """
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "group": group, "check": check, "cli": cli, "flag": flag}
    return field(default=default, metadata=meta)


def parse_threshold_policy(policy: str) -> tuple[str, float | None]:
    """``youden`` | ``balanced`` | ``sensitivity:S`` | ``fixed:T`` → (name, number or None)."""
    name, _, arg = policy.partition(":")
    if name in ("youden", "balanced") and not arg:
        return name, None
    if name in ("sensitivity", "fixed") and arg:
        try:
            v = float(arg)
        except ValueError:
            v = -1.0
        if 0.0 <= v <= 1.0:
            return name, v
    raise SettingError(f"threshold_policy {policy!r}: use youden, balanced, sensitivity:S or fixed:T with S, T in [0, 1]")


def _check_policy(value: str) -> str | None:
    try:
        parse_threshold_policy(value)
    except SettingError as e:
        return str(e).split(" ", 1)[1]  # the message without the leading setting name
    return None


def check_device(value: str) -> str | None:
    """The form of a ``device`` value (auto, cpu, cuda, cuda:N); whether that device exists is
    checked where torch is loaded (:func:`imgclf.engines.runtimes.resolve_device`)."""
    name, colon, index = value.partition(":")
    if value in ("auto", "cpu", "cuda") or (name == "cuda" and colon and index.isdigit() and index.isascii()):
        return None
    return f"must be auto, cpu, cuda or cuda:N (N a GPU index), got {value!r}"


class Declared:
    """Base of the declared settings dataclasses: every field checked against its declaration."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            check_value(f, getattr(self, f.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainSettings(Declared):
    """What a training run does. The declared values are the ``finetune`` recipe's; ``recipe`` names
    the default recipe, ``ensemble``, whose overrides (:mod:`imgclf.config.recipes`) ``make_settings``
    applies: build settings with ``make_settings``, not with ``TrainSettings()`` alone."""

    recipe: str = setting("ensemble", "named settings that the other flags override: ensemble = efficientnet_lite0+lite1 frozen (each backbone's last four stages pooled), cached features, five heads per backbone, probabilities averaged; fast = efficientnet_lite0_stages frozen (Lite0's last four stages pooled), five heads (one backbone to run; a stage-2 flag brings the conv-head efficientnet_lite0 that stage 2 fine-tunes); finetune = efficientnet_lite0 frozen (its conv head pooled), five heads, then the last --unfreeze blocks trained with the first head, kept only if they beat the frozen heads on validation; seed = the tutorial as written (x/255 and sigmoid bugs kept, 5 epochs; comparison only)", choices=RECIPE_NAMES, group="model")
    # model
    backbone: str = setting(DEFAULT_BACKBONE, "backbone registry name (see README: efficientnet_lite0/1/2, efficientnet_lite0_stages = Lite0 pooling its last four stages' outputs (frozen only), efficientnet_lite0+lite1 = both as one probability ensemble, vgg16, resnet50, ..., timm:<name>)", group="model")
    weights: str = setting("imagenet", "imagenet (the entry's pretrained source: cache first, then hub), none, or a .pth/.pt/.bin/.safetensors state-dict path", group="model")
    head: str = setting("recipe", "recipe: Linear 512 + ReLU + Dropout 0.5 + Linear N; linear: one Linear; tutorial: the recipe head with the tutorial's sigmoid before the loss (comparison only)", choices=HEAD_KINDS, group="model")
    heads: int = setting(5, "stage 1 trains this many heads on the frozen features (this many per backbone for several backbones together) (seeds seed, seed+1, ...) and averages their probabilities: an ensemble that lowers the variance of a single head; stage 2 tunes the tail with the first head and replaces the frozen heads only if it beats them on calibrated validation loss", ge=1, le=MAX_HEADS, group="model")
    refit: bool = setting(True, "once validation has chosen each frozen head's epochs, the temperature and the threshold, the heads train again on train + validation for those epochs and are the model (frozen backbone, one feature view; --no-refit: the heads trained without the validation images)", group="model")
    input_scaling: str = setting("entry", "entry: the backbone's own preprocessing; x/255: the tutorial's bug (squash resize, nearest), comparison only", choices=INPUT_SCALINGS, group="model")
    # stage 1: the head on cached frozen features
    epochs: int = setting(30, "maximum head epochs", ge=1)
    lr: float = setting(1e-3, "Adam learning rate of the head", gt=0)
    batch_size: int = setting(32, "batch size", ge=1)
    patience: int = setting(5, "early stopping: epochs without validation-loss improvement, 0 = off", ge=0)
    checkpoint: str = setting("best", "weights kept: best by validation loss, or the last epoch's", choices=CHECKPOINTS)
    class_weight: str = setting("auto", "loss class weights; auto = inverse frequency when the largest class is > 1.5x the smallest", choices=CLASS_WEIGHTS)
    loss: str = setting("ce", "softmax cross-entropy or focal loss", choices=LOSSES)
    focal_gamma: float = setting(2.0, "focal loss gamma", ge=0)
    sampler: str = setting("shuffle", "shuffle, or class-balanced sampling with replacement", choices=SAMPLERS)
    label_smoothing: float = setting(0.0, "head-stage label smoothing", ge=0, lt=1)
    mixup: float = setting(0.0, "mixup alpha on the trainable part's inputs, 0 = off", ge=0)
    # stage 2: fine-tuning the last blocks on cached frozen-prefix activations
    unfreeze: int | None = setting(None, "stage 2: number of last backbone blocks to train (unset: the entry's default, e.g. 2 for efficientnet_lite0, 1 for vgg16)", ge=1, group="fine-tuning")
    finetune_epochs: int = setting(12, "stage-2 epochs, 0 = no stage 2", ge=0, group="fine-tuning")
    finetune_lr: float = setting(1e-3, "stage-2 head learning rate; blocks get half per block going down", gt=0, group="fine-tuning")
    finetune_patience: int = setting(4, "stage-2 early stopping patience, 0 = off", ge=0, group="fine-tuning")
    finetune_views: int = setting(4, "augmented views per image whose frozen-prefix activations are computed once and held in memory", ge=1, group="fine-tuning")
    finetune_label_smoothing: float = setting(0.1, "stage-2 label smoothing", ge=0, lt=1, group="fine-tuning")
    finetune_bn: str = setting("frozen", "BatchNorm statistics of the unfrozen blocks: frozen = kept (scale and shift still train), train = follow the batches", choices=TAIL_BN_MODES, group="fine-tuning")
    finetune_monitor: str = setting("val_calibrated_loss", "what picks the best stage-2 epoch and decides whether it replaces the frozen model: temperature-calibrated validation cross-entropy, accuracy (ties: loss), or plain cross-entropy", choices=MONITORS, group="fine-tuning")
    finetune_cutmix: float = setting(0.0, "CutMix alpha on the frozen-prefix activation maps (boxes pasted between images, labels mixed by area); with --mixup one or the other per batch; 0 = off", ge=0, group="fine-tuning")
    finetune_optimizer: str = setting("adamw", "stage-2 optimiser", choices=OPTIMIZERS, group="fine-tuning")
    finetune_weight_decay: float = setting(0.01, "stage-2 weight decay", ge=0, group="fine-tuning")
    finetune_warmup_epochs: float = setting(1.0, "stage-2 linear warmup, in epochs", ge=0, group="fine-tuning")
    finetune_schedule: str = setting("cosine", "stage-2 learning-rate schedule after warmup", choices=SCHEDULES, group="fine-tuning")
    # augmentation
    augment: str = setting("light", "preset: light = flips, 90-degree rotations, crop >= 80% area, jitter 0.1; strong = crop >= 50%, jitter 0.25", choices=AUGMENT_PRESETS, group="augmentation")
    hflip: bool | None = setting(None, "random horizontal flips (unset: the preset's)", group="augmentation")
    vflip: bool | None = setting(None, "random vertical flips; lesions have no up (unset: the preset's)", group="augmentation")
    rot90: bool | None = setting(None, "random 90-degree rotations (unset: the preset's)", group="augmentation")
    crop_scale: float | None = setting(None, "random resized crop keeps at least this fraction of the area, 1 = off (unset: the preset's)", gt=0, le=1, group="augmentation")
    color_jitter: float | None = setting(None, "max relative brightness/contrast/saturation change, 0 = off (unset: the preset's)", ge=0, lt=1, group="augmentation")
    feature_views: int = setting(1, "frozen stage: cached augmented views per training image", ge=1, group="augmentation")
    # decision
    threshold_policy: str = setting("youden", "binary: youden | balanced | sensitivity:S | fixed:T, chosen on validation and stored in the model", check=_check_policy, group="decision")
    tta: str = setting("none", f"test-time augmentation stored with the model: average probabilities over flips/rotations (flips: 4 views; d4: 6, flips and quarter turns); auto = chosen on the validation split: the fewest views whose calibrated validation log loss is within {TTA_AUTO_MARGIN} of the best of {'/'.join(TTA_AUTO_CANDIDATES)}", choices=TTA_CHOICES, group="decision")
    calibration: str = setting("temperature", "post-hoc probability calibration of the final model on the validation split: temperature = one T dividing the logits (bounded, shrunk towards 1 when validation is small or has no mistakes), stored in the model; none = the trained head's probabilities", choices=CALIBRATIONS, group="decision")
    # similar cases (imgclf.model.neighbors)
    neighbors: bool = setting(True, "store a similar-cases index with the model: each training image's features (float16), label, path and a small JPEG thumbnail, for predict --neighbors K and the report's nearest training cases (--no-neighbors: none)", group="similar cases")
    neighbors_max: int = setting(20000, "most training images in the similar-cases index (about 3-5 KB each with 1280-d features and 64 px thumbnails, so <= ~100 MB); above it a seeded stratified sample of this many is stored, with a warning", ge=1, group="similar cases")
    neighbors_thumbnail: int = setting(64, "side in pixels of each stored case's JPEG thumbnail, 0 = no thumbnails", ge=0, le=512, group="similar cases")
    # data
    seed: int = setting(0, "seed for splits, initialisation, shuffling and augmentation", group="data")
    val_fraction: float = setting(0.2, "fraction of train carved for validation when the dataset has none", ge=0, lt=1, group="data")
    test_fraction: float = setting(0.2, "fraction of train carved for test when the dataset has none", ge=0, lt=1, group="data")

    def __post_init__(self):
        super().__post_init__()
        if self.val_fraction + self.test_fraction >= 1:
            raise SettingError(f"val_fraction + test_fraction must be < 1, got {self.val_fraction} + {self.test_fraction}")


    @property
    def stage2(self) -> bool:
        """Whether a fit runs stage 2: asked for, and a backbone it can fine-tune (several together,
        or a Lite entry pooling its stage outputs, skip it)."""
        return self.finetune_epochs > 0 and not is_frozen_only(self.backbone)


@dataclass(frozen=True)
class RuntimeOptions(Declared):
    """How a model computes, not what it learns: never changes results beyond engine tolerance."""

    engine: str = setting("auto", "backbone inference engine (auto = fastest available)", choices=ENGINES, group="runtime")
    precision: str = setting("auto", "backbone precision (auto: bf16 where the CPU has it; fp32 forces full precision)", choices=PRECISIONS, group="runtime")
    device: str = setting("auto", "where PyTorch computes (fine-tuning, and extraction on the torch engine): auto = the GPU when CUDA is available, else the CPU; cpu; cuda or cuda:N (under torchrun each rank takes GPU LOCAL_RANK; cuda:N only with one process per machine); ONNX Runtime and OpenVINO always run on the CPU", check=check_device, group="runtime")
    cache_dir: str | None = setting(None, "feature cache folder (default: $IMGCLF_CACHE_DIR or ~/.cache/imgclf); never inside the dataset", group="runtime")
    use_cache: bool = setting(True, "read and write the feature cache", group="runtime", flag="cache")
    progress: bool = setting(False, "progress bars", group="runtime")



@dataclass(frozen=True)
class RunOptions(Declared):
    """Where a training run writes and what it adds beyond the model."""

    project: str = setting("runs", "parent folder of run folders", group="output")
    name: str = setting("train", "run folder name; -2, -3... appended if taken", check=lambda v: None if v and v not in (".", "..") and all(c.isalnum() or c in "._-" for c in v) else "must use letters, digits, '.', '_' or '-'", group="output")
    validation: str | None = setting(None, "a folder of class sub-folders to use as the validation split (nothing is carved from train then)", group="data")
    manifest: str | None = setting(None, "a CSV with a header row path,label[,split] listing the images (paths relative to the CSV's folder or absolute; an empty or missing split is carved), instead of DATA", group="data")
    bootstrap: int = setting(1000, "bootstrap resamples for the 95% confidence intervals, 0 = none", ge=0, group="decision")
    report: bool = setting(True, "write plots and report.html into the run folder", group="output")
    exclude: str | None = setting(None, "a file of image paths to leave out of every split (one per line, or a CSV with a path column such as a filtered audit.csv from imgclf audit); relative paths are under the dataset root; listed in skipped.csv", group="data")
    resume: str | None = setting(None, "continue the interrupted run folder RESUME from its last complete epoch, with the settings in its config.json (flags given must match them) on the same data", group="output")
    cv: int = setting(0, "cross-validation: also fit the same settings K times, each time holding out one of K stratified folds of ALL labelled images (train, validation and test; exact duplicates kept in one fold), and report per-fold and pooled out-of-fold metrics with 95% intervals; the model bundle and test metrics stay the normal run's; 0 = off", check=lambda v: None if v == 0 or v >= 2 else "must be 0 (off) or at least 2", group="decision")
    cv_repeats: int = setting(1, "cross-validation: repeat the K folds this many times with a different shuffle (K x R fits)", ge=1, group="decision")



def _types(cls) -> dict[str, type]:
    return get_type_hints(cls)


def base_type(annotation) -> type:
    """``int | None`` → int; ``bool`` → bool."""
    args = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    return args[0] if args else annotation


def check_value(f: dataclasses.Field, value) -> None:
    """Type, choices, bounds and the field's own rule; raises SettingError naming the setting."""
    meta, name = f.metadata, f.name
    if value is None:
        if f.default is None:
            return
        raise SettingError(f"{name} must be set")
    want = base_type(FIELD_TYPES[name])
    value = coerce(value, f)
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if not ok:
        raise SettingError(f"{name} must be {want.__name__}, got {value!r}")
    if want is float and not math.isfinite(value):
        raise SettingError(f"{name} must be a finite number, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise SettingError(f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    for key, op, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"), ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
        bound = meta.get(key)
        if bound is not None and not op(value, bound):
            raise SettingError(f"{name} must be {word} {bound:g}, got {value!r}")
    if meta.get("check"):
        problem = meta["check"](value)
        if problem:
            raise SettingError(f"{name} {problem}")


FIELD_TYPES: dict[str, Any] = {**_types(TrainSettings), **_types(RuntimeOptions), **_types(RunOptions)}
TRAIN_FIELDS = {f.name: f for f in dataclasses.fields(TrainSettings)}
RUNTIME_FIELDS = {f.name: f for f in dataclasses.fields(RuntimeOptions)}
RUN_FIELDS = {f.name: f for f in dataclasses.fields(RunOptions)}


def register_settings(cls) -> dict[str, dataclasses.Field]:
    """Make a settings dataclass declared in a higher layer (the server's ServeConfig) known to
    :func:`check_value` and the generated flags; returns its fields by name.

    Call it right after the class statement, before any instance is made. A name already
    declared with another type is refused, since types are looked up by setting name.
    """
    hints = _types(cls)
    clashes = sorted(n for n, t in hints.items() if n in FIELD_TYPES and FIELD_TYPES[n] != t)
    if clashes:
        raise TypeError(f"{cls.__name__}: setting(s) {', '.join(clashes)} already declared with another type")
    FIELD_TYPES.update(hints)
    return {f.name: f for f in dataclasses.fields(cls)}


def coerce(value, f: dataclasses.Field):
    """Path-likes become text and ints become floats where the field is a float."""
    want = base_type(FIELD_TYPES[f.name])
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def build(cls, fields: dict[str, dataclasses.Field], what: str, **values):
    """``cls(**values)`` after refusing unknown names and coercing path-likes and ints."""
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SettingError(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(fields)})")
    return cls(**{k: coerce(v, fields[k]) for k, v in values.items()})


def make_runtime(**options) -> RuntimeOptions:
    return build(RuntimeOptions, RUNTIME_FIELDS, "runtime option(s)", **options)


def make_run_options(**options) -> RunOptions:
    return build(RunOptions, RUN_FIELDS, "run option(s)", **options)
