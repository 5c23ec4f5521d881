"""Backbone registry names, importable without torch so ``imgclf --help`` starts fast."""

DEFAULT_BACKBONE = "efficientnet_lite0"
LITE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
TORCHVISION_NAMES = ("vgg16", "resnet50", "efficientnet_b0", "mobilenet_v3_large", "convnext_tiny")
BACKBONE_NAMES = LITE_NAMES + TORCHVISION_NAMES + ("timm:<name>",)
