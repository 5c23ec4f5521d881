"""Named recipes: each is a set of overrides of the declared defaults (:mod:`imgclf.config.settings`).

The declared defaults are the ``finetune`` recipe on EfficientNet-Lite0; the default recipe,
``ensemble``, overrides them:

* ``ensemble`` (default) — ``efficientnet_lite0+lite1`` frozen: each image through both
  backbones once (features cached: each backbone's last four stages' outputs, pooled), five
  heads per backbone on its own features, trained with mixup (alpha 0.2) of the features,
  all their probabilities averaged: two backbones' different errors averaged out, without
  stage 2's cost (what it measured against the others: benchmarks/README.md, "The default
  becomes Lite0 + Lite1 frozen", "Stage outputs instead of the conv head" and "Mixup of the
  features for the default's heads").
* ``fast`` — stage 1 only on Lite0 (``efficientnet_lite0_stages``: its last four stages' outputs,
  pooled, as each member of the default's pair): frozen backbone, cached features, the five heads.
* ``finetune`` — the declared defaults: stage 1 trains five heads on Lite0's cached frozen
  features; stage 2 unfreezes the last K blocks (``unfreeze``) and trains them with the
  first head (AdamW, learning rate halved per block going down, warmup + cosine, label
  smoothing, light augmentation through cached views of the frozen prefix, BatchNorm
  statistics kept, best epoch by the temperature-calibrated validation loss), and replaces
  the frozen heads only if it beats them on that monitor.
* ``seed`` — the tutorial as written, for comparison only: x/255 input scaling (its
  preprocessing bug, kept on purpose and warned about), squash resize with nearest
  sampling, the tutorial's head (one) with its sigmoid in front of categorical cross-entropy,
  Adam 1e-3, batch 32, 5 epochs, last-epoch weights, no augmentation, no class weights.
"""

from __future__ import annotations

from imgclf.config.names import ENSEMBLE_BACKBONE, FAST_BACKBONE, LITE_STAGE_NAMES, is_branched, is_frozen_only
from imgclf.config.settings import RECIPE_NAMES, TRAIN_FIELDS, SettingError, TrainSettings, build

DEFAULT_RECIPE = TRAIN_FIELDS["recipe"].default

_FROZEN = {"finetune_epochs": 0, "augment": "none"}

RECIPES: dict[str, dict] = {
    "ensemble": {**_FROZEN, "backbone": ENSEMBLE_BACKBONE, "mixup": 0.2},
    "finetune": {},
    "fast": {**_FROZEN, "backbone": FAST_BACKBONE},
    "seed": {
        **_FROZEN, "head": "tutorial", "epochs": 5, "patience": 0, "checkpoint": "last", "class_weight": "none",
        "input_scaling": "x/255", "threshold_policy": "fixed:0.5", "calibration": "none", "heads": 1, "refit": False,
    },
}
assert tuple(sorted(RECIPES)) == tuple(sorted(RECIPE_NAMES)) and all(k in TRAIN_FIELDS for r in RECIPES.values() for k in r)

# blocks to unfreeze by default per backbone family/arch (counted from the end)
_DEFAULT_UNFREEZE = {"efficientnet_lite": 2, "vgg16": 1, "resnet50": 1, "efficientnet_b0": 2, "mobilenet_v3_large": 3, "convnext_tiny": 2}


def default_unfreeze(spec) -> int:
    return _DEFAULT_UNFREEZE.get(spec.family, _DEFAULT_UNFREEZE.get(spec.arch, 1))


def _is_stage2(name: str) -> bool:
    return name == "unfreeze" or name.startswith("finetune_")


def recipe_values(recipe: str, given: dict) -> dict:
    """The recipe's overrides as they apply under ``given``: an explicit ``unfreeze`` or
    ``finetune_*`` asks for stage 2, so a frozen recipe's stage-2 values step aside, and so does
    a stage-pooled Lite backbone (``fast``'s) for the conv-head entry that stage 2 fine-tunes."""
    if recipe not in RECIPES:
        raise SettingError(f"recipe must be one of {', '.join(RECIPE_NAMES)}, got {recipe!r}")
    values = dict(RECIPES[recipe])
    if any(_is_stage2(k) for k in given):
        tuned = given.get("finetune_epochs", TRAIN_FIELDS["finetune_epochs"].default) > 0  # stage 2 will run
        values = {k: v for k, v in values.items() if not _is_stage2(k) and not (tuned and k == "backbone" and v in LITE_STAGE_NAMES)}
    return values


def make_settings(recipe: str | None = None, **overrides) -> TrainSettings:
    """Declared defaults ⊕ the recipe's values ⊕ every override that is not None; validated."""
    given = {k: v for k, v in overrides.items() if v is not None}
    recipe = recipe or DEFAULT_RECIPE
    settings = build(TrainSettings, TRAIN_FIELDS, "setting(s)", **{**recipe_values(recipe, given), **given, "recipe": recipe})
    asked = sorted(k for k in given if _is_stage2(k))
    if asked and settings.finetune_epochs > 0 and is_frozen_only(settings.backbone) and "backbone" not in given:  # the recipe's backbone
        why = "is several" if is_branched(settings.backbone) else "pools stage outputs from inside the network"
        raise SettingError(f"{', '.join(asked)}: stage 2 fine-tunes the last blocks of one backbone under its conv head, and {settings.backbone} {why}; "
                           "use --recipe finetune (efficientnet_lite0; --backbone chooses another single backbone)")
    return settings


def recipe_default(name: str, recipe: str) -> object:
    """What ``name`` is under ``recipe`` when not given."""
    return RECIPES[recipe].get(name, TRAIN_FIELDS[name].default)
