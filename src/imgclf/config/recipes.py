"""Named training recipes: documented sets of defaults that any flag can override.

* ``seed``     — the tutorial as written, for comparison only: x/255 input scaling (its
                 preprocessing bug, kept on purpose and warned about), squash resize with
                 nearest-neighbour sampling (Keras ``flow_from_directory``), the tutorial's
                 head with its sigmoid in front of categorical cross-entropy (``--head
                 tutorial``, also warned about), Adam 1e-3, batch 32, 5 epochs, last-epoch
                 weights, frozen backbone, no augmentation, no class weights.
* ``fast``     — frozen backbone, cached features, head only, early stopping.
* ``finetune`` — (default) stage 1 as ``fast``; stage 2 unfreezes the last K blocks
                 (``--unfreeze``) and trains them with the head: AdamW, discriminative
                 learning rates (halved per block going down), 1 warmup epoch + cosine,
                 label smoothing 0.1, light augmentation through K cached views of the
                 frozen prefix, BatchNorm statistics kept (``--finetune-bn frozen``), early
                 stopping and best checkpoint by ``--finetune-monitor`` (default: the
                 temperature-calibrated validation loss). The fine-tuned model replaces the
                 frozen one only if it beats it on that monitor.
"""

from __future__ import annotations

RECIPE_NAMES = ("seed", "fast", "finetune")
DEFAULT_RECIPE = "finetune"

_COMMON = dict(
    head="recipe", epochs=30, lr=1e-3, batch_size=32, patience=5, class_weight="auto", checkpoint="best",
    augment="none", feature_views=1, unfreeze=0, loss="ce", sampler="shuffle", label_smoothing=0.0, mixup=0.0,
    input_scaling="entry", threshold_policy="youden", tta="none",
    finetune_epochs=0, finetune_lr=0.0, finetune_patience=0, finetune_views=1, finetune_label_smoothing=0.0,
    finetune_bn="frozen", finetune_monitor="val_calibrated_loss", finetune_cutmix=0.0,
)

RECIPES: dict[str, dict] = {
    "seed": {**_COMMON, "head": "tutorial", "epochs": 5, "patience": 0, "checkpoint": "last", "class_weight": "none", "input_scaling": "x/255", "threshold_policy": "fixed:0.5"},
    "fast": dict(_COMMON),
    "finetune": {
        **_COMMON,
        "unfreeze": None,  # the backbone entry's default (see default_unfreeze)
        "augment": "light",
        "finetune_epochs": 12,
        "finetune_lr": 1e-3,
        "finetune_patience": 4,
        "finetune_views": 4,
        "finetune_label_smoothing": 0.1,
    },
}

# blocks to unfreeze by default per backbone family/arch (counted from the end)
_DEFAULT_UNFREEZE = {"efficientnet_lite": 3, "vgg16": 1, "resnet50": 1, "efficientnet_b0": 2, "mobilenet_v3_large": 3, "convnext_tiny": 2}


def default_unfreeze(spec) -> int:
    return _DEFAULT_UNFREEZE.get(spec.family, _DEFAULT_UNFREEZE.get(spec.arch, 1))


def resolve_recipe(name: str, overrides: dict) -> dict:
    """Recipe defaults with every non-None override applied."""
    if name not in RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPE_NAMES)}, not {name!r}")
    out = dict(RECIPES[name])
    unknown = set(overrides) - set(out) - {"augment_flags"}
    if unknown:
        raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    given = {k: v for k, v in overrides.items() if v is not None}
    out.update(given)
    wants_finetune = bool(given.get("unfreeze")) or any(k.startswith("finetune_") for k in given)
    if name != "finetune" and wants_finetune:
        # an explicit --unfreeze / --finetune-* asks for stage 2: take the finetune
        # recipe's values for the stage-2 settings that were not given
        for k, v in RECIPES["finetune"].items():
            if (k.startswith("finetune_") or k == "unfreeze") and k not in given:
                out[k] = v
    out["recipe"] = name
    return out
