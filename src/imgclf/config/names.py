"""Backbone registry names, importable without torch so ``imgclf --help`` starts fast."""

DEFAULT_BACKBONE = "efficientnet_lite0"
LITE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
TORCHVISION_NAMES = ("vgg16", "resnet50", "efficientnet_b0", "mobilenet_v3_large", "convnext_tiny")
# several Lite backbones as one (each on the image, features side by side, one group of heads per
# backbone, probabilities averaged; any two or three of LITE_NAMES): this pair is the default recipe's
ENSEMBLE_BACKBONE = "efficientnet_lite0+lite1"
BACKBONE_NAMES = LITE_NAMES + (ENSEMBLE_BACKBONE,) + TORCHVISION_NAMES + ("timm:<name>",)


def is_branched(name: str) -> bool:
    """Whether ``name`` asks for several backbones together (stage 2 cannot fine-tune those)."""
    return name.startswith("efficientnet_") and "+" in name
