"""A feature extractor's body regrouped as named blocks in order, so ``--unfreeze K`` can
train the last K; a layout that cannot be mapped and checked is refused, never guessed."""

from __future__ import annotations

import torch
from torch import nn

from imgclf.backbones.modules import FeatureExtractor, lite_stage_ends
from imgclf.backbones.specs import BackboneSpec
from imgclf.config.names import lite_base


class BlocksUnknownError(ValueError):
    """The backbone's body cannot be split into blocks, so it cannot be fine-tuned block-wise."""


def _timm_blocks(net: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """Blocks of the common timm layouts, in ``forward_features`` order."""

    def seq(*names):
        return nn.Sequential(*[getattr(net, n) for n in names if isinstance(getattr(net, n, None), nn.Module)])

    if isinstance(getattr(net, "conv_stem", None), nn.Module) and isinstance(getattr(net, "blocks", None), nn.Sequential):
        # EfficientNet / MobileNet family: conv_stem, bn1, blocks, conv_head, bn2
        return [("stem", seq("conv_stem", "bn1"))] + [(f"blocks.{i}", b) for i, b in enumerate(net.blocks)] + [("head", seq("conv_head", "bn2"))]
    if all(isinstance(getattr(net, f"layer{i}", None), nn.Module) for i in range(1, 5)) and hasattr(net, "conv1"):
        # ResNet family: conv1, bn1, act1, maxpool, layer1..4
        return [("stem", seq("conv1", "bn1", "act1", "maxpool"))] + [(f"layer{i}", getattr(net, f"layer{i}")) for i in range(1, 5)]
    if isinstance(getattr(net, "stem", None), nn.Module) and isinstance(getattr(net, "stages", None), nn.Sequential):
        # ConvNeXt, ByobNet, NFNet, RegNet, ...: stem, stages, then an optional final norm / conv,
        # which goes with the last stage (alone it is often an Identity: nothing to train)
        stages = [(f"stages.{i}", b) for i, b in enumerate(net.stages)]
        stages[-1] = (f"stages.{len(stages) - 1}+final", nn.Sequential(stages[-1][1], seq("norm_pre", "final_conv", "final_act")))
        return [("stem", net.stem)] + stages
    raise BlocksUnknownError(f"{name}: its block structure is not mapped, so it cannot be fine-tuned")


def check_blocks_compose(fx: FeatureExtractor, blocks: list[tuple[str, nn.Module]], spec: BackboneSpec) -> None:
    """Refuse a mapping whose blocks, applied in order, do not reproduce ``fx.body``."""
    s = spec.preprocessing.input_size
    x = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0))
    training = fx.training
    fx.eval()
    try:
        with torch.no_grad():
            want = fx.body(x)
            got = x
            for _, b in blocks:
                got = b(got)
    except Exception as e:  # a block that cannot run on its own
        raise BlocksUnknownError(f"{spec.name}: its mapped blocks do not run in sequence ({type(e).__name__}), so it cannot be fine-tuned") from e
    finally:
        fx.train(training)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise BlocksUnknownError(f"{spec.name}: its mapped blocks do not reproduce forward_features, so it cannot be fine-tuned")


def backbone_blocks(fx: FeatureExtractor, spec: BackboneSpec) -> list[tuple[str, nn.Module]]:
    """The body as named blocks in order; applied in sequence they equal ``fx.body``.

    ``--unfreeze K`` trains the last K of these. The modules are the body's own
    (shared parameters), only regrouped.
    """
    body = fx.body
    if spec.family == "branched":
        raise BlocksUnknownError(f"{spec.name}: stage 2 fine-tunes the blocks of one backbone, and this entry is several")
    if spec.family == "efficientnet_lite" and spec.extra.get("stages"):
        raise BlocksUnknownError(f"{spec.name}: its features are stage outputs from inside the network, and stage 2 fine-tunes "
                                 f"the conv-head entry ({lite_base(spec.name)})")
    if spec.family == "efficientnet_lite":
        net = body.net
        ends, blocks = lite_stage_ends(net), list(net._blocks)
        stages = [blocks[start:end + 1] for start, end in zip([0] + [e + 1 for e in ends[:-1]], ends)]
        stem, head = nn.Sequential(net._conv_stem, net._bn0, net._swish), nn.Sequential(net._conv_head, net._bn1, net._swish)
        return [("stem", stem)] + [(f"stage{i + 1}", nn.Sequential(*s)) for i, s in enumerate(stages)] + [("head", head)]
    if spec.family == "torchvision":
        if spec.arch == "vgg16":
            blocks, current, k = [], [], 1
            for layer in body:
                current.append(layer)
                if isinstance(layer, nn.MaxPool2d):
                    blocks.append((f"block{k}", nn.Sequential(*current)))
                    current, k = [], k + 1
            return blocks
        if spec.arch == "resnet50":
            children = list(body.children())
            return [("stem", nn.Sequential(*children[:4]))] + [(f"layer{i}", children[3 + i]) for i in range(1, 5)]
        return [(f"features.{i}", m) for i, m in enumerate(body)]
    if spec.family == "timm":
        blocks = _timm_blocks(body.net, spec.name)
        check_blocks_compose(fx, blocks, spec)
        return blocks
    raise AssertionError(spec.family)
