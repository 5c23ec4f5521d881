"""Backbone registry names, importable without torch so ``imgclf --help`` starts fast."""

DEFAULT_BACKBONE = "efficientnet_lite0"
LITE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# a Lite backbone whose features are its last stages' outputs, pooled, instead of its conv head's
# (never fine-tuned: stage 2 trains the conv-head entry's last blocks); the fast recipe's backbone
STAGES_SUFFIX = "_stages"
LITE_STAGE_NAMES = tuple(n + STAGES_SUFFIX for n in LITE_NAMES)
FAST_BACKBONE = LITE_STAGE_NAMES[0]
TORCHVISION_NAMES = ("vgg16", "resnet50", "efficientnet_b0", "mobilenet_v3_large", "convnext_tiny")
# several Lite backbones as one (each on the image, features side by side, one group of heads per
# backbone, probabilities averaged; any two or three of LITE_NAMES): this pair is the default recipe's
ENSEMBLE_BACKBONE = "efficientnet_lite0+lite1"
BACKBONE_NAMES = LITE_NAMES + LITE_STAGE_NAMES + (ENSEMBLE_BACKBONE,) + TORCHVISION_NAMES + ("timm:<name>",)


def is_branched(name: str) -> bool:
    """Whether ``name`` asks for several backbones together (stage 2 cannot fine-tune those)."""
    return name.startswith("efficientnet_") and "+" in name


def lite_base(name: str) -> str:
    """The Lite network a Lite entry runs (``efficientnet_lite0_stages`` → ``efficientnet_lite0``)."""
    return name.removesuffix(STAGES_SUFFIX) if name in LITE_STAGE_NAMES else name


def is_frozen_only(name: str) -> bool:
    """Whether ``name``'s features are never fine-tuned (several backbones, or stage outputs):
    a fit with it skips stage 2."""
    return is_branched(name) or name in LITE_STAGE_NAMES
