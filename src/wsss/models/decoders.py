"""The segmentation decoders by name, and the one function that builds a segmentation model from its settings.

Each decoder sits on one kind of backbone (:func:`wsss.models.create_model` builds them all):

- ``light`` (:class:`~wsss.models.segmenter.SegmentationModel`) and ``dpt``
  (:class:`~wsss.models.dpt.DPTSegmentationModel`) on a ViT, with the settings ``levels``, ``dim``, ``dropout``;
- ``deeplabv2`` (:class:`~wsss.segment.deeplab.DeepLabV2`, ASPP) on a headless ResNet (``resnet101``), with
  ``rates`` and ``freeze_bn``;
- ``affinity`` (:mod:`wsss.models.affinitynet`, PSA's AffinityNet; its output is pair-affinity features, not
  logits: task ``affinity``) on a ViT or PSA's ResNet-38, with ``radius`` and (ViT) ``levels``;
- ``deeplab_resnet38`` (:class:`~wsss.segment.deeplab.ResNet38DeepLab`, AReAM's) on PSA's ResNet-38
  (``resnet38d``), with ``head_channels``, ``head_dilation``, ``freeze_bn`` and ``freeze_stem``: the flat-named
  network is built and the backbone's weights loaded into it, so the authors' checkpoints keep their names.

Every model :func:`make_segmenter` returns gives its logits at the input size (``model(x)`` ``(B, C, H, W)``), and
has ``num_classes``, ``patch_size`` (the multiple test-time views are rounded to), ``decoder_name`` and ``config()``
(what a checkpoint's spec stores; :func:`make_segmenter` rebuilds the model from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import nn

from .conformer import Conformer
from .dpt import DPTSegmentationModel
from .resnet import ResNet
from .resnet38 import ResNet38
from .segmenter import SegmentationModel
from .vit import VisionTransformer


TRANSFORMERS = (VisionTransformer, Conformer)  # the backbones the ViT decoders read (a Conformer's transformer branch)


@dataclass(frozen=True)
class Decoder:
    """A registered segmentation decoder: the backbone class (or classes) it builds on (``kind`` names it in
    messages), the settings it reads besides ``decoder`` and ``num_classes``, and ``build(backbone, num_classes,
    config)``."""

    backbone: type[nn.Module] | tuple[type[nn.Module], ...]
    kind: str
    settings: tuple[str, ...]
    build: Callable[[Any, int, Mapping[str, Any]], nn.Module]
    task: str = "segmentation"  # what the model's output is: "segmentation" logits, or "affinity" features


def _vit_decoder(cls: type) -> Callable[[VisionTransformer, int, Mapping[str, Any]], nn.Module]:
    def build(backbone: VisionTransformer, num_classes: int, config: Mapping[str, Any]) -> nn.Module:
        return cls(backbone, num_classes, levels=config.get("levels"), dim=int(config["dim"]),
                   dropout=float(config.get("dropout", 0.1)))
    return build


# wsss.segment.deeplab is imported when a DeepLab is built, not here: the wsss.segment package imports this module.
def _deeplabv2(backbone: ResNet, num_classes: int, config: Mapping[str, Any]) -> nn.Module:
    from ..segment.deeplab import ASPP_RATES, DeepLabV2

    return DeepLabV2(num_classes, backbone, rates=tuple(config.get("rates", ASPP_RATES)),
                     freeze_bn=bool(config.get("freeze_bn", True)), upsample=True)


def _deeplab_resnet38(backbone: ResNet38, num_classes: int, config: Mapping[str, Any]) -> nn.Module:
    from ..segment.deeplab import ResNet38DeepLab

    model = ResNet38DeepLab(num_classes, freeze_bn=bool(config.get("freeze_bn", True)),
                            freeze_stem=bool(config.get("freeze_stem", True)),
                            head_channels=int(config.get("head_channels", 512)),
                            head_dilation=int(config.get("head_dilation", 12)), upsample=True)
    model.load_backbone(backbone.state_dict())
    return model


DECODERS: dict[str, Decoder] = {
    "light": Decoder(TRANSFORMERS, "a ViT", ("levels", "dim", "dropout"), _vit_decoder(SegmentationModel)),
    "dpt": Decoder(TRANSFORMERS, "a ViT", ("levels", "dim", "dropout"), _vit_decoder(DPTSegmentationModel)),
    "deeplabv2": Decoder(ResNet, "a headless ResNet (resnet101)", ("rates", "freeze_bn"), _deeplabv2),
    "deeplab_resnet38": Decoder(ResNet38, "PSA's ResNet-38 (resnet38d)",
                                ("head_channels", "head_dilation", "freeze_bn", "freeze_stem"), _deeplab_resnet38),
}


def _affinity(backbone: nn.Module, num_classes: int, config: Mapping[str, Any]) -> nn.Module:
    from .affinitynet import PSA_RADIUS, build_affinity_net

    return build_affinity_net(backbone, radius=int(config.get("radius", PSA_RADIUS)), levels=config.get("levels"))


DECODERS["affinity"] = Decoder((VisionTransformer, ResNet38), "a ViT or PSA's ResNet-38 (resnet38d)",
                               ("radius", "levels"), _affinity, task="affinity")


def make_segmenter(backbone: nn.Module, config: Mapping[str, Any]) -> nn.Module:
    """The segmentation model ``config`` describes (a spec's ``segmenter``: ``decoder``, ``num_classes`` and the
    decoder's own settings, see the module docstring; a spec without ``decoder`` is the light one, as before it
    existed).

    Raises:
        ValueError: an unknown decoder, a backbone it does not sit on, a setting it does not have, or settings it
            cannot be built with.
    """
    name = config.get("decoder", "light")
    if name not in DECODERS:
        raise ValueError(f"unknown segmentation decoder {name!r}; choose one of {', '.join(DECODERS)}")
    decoder = DECODERS[name]
    if not isinstance(backbone, decoder.backbone):
        fitting = [n for n, d in DECODERS.items() if isinstance(backbone, d.backbone)]
        hint = f"; for this backbone choose {' or '.join(fitting)}" if fitting else ""
        raise ValueError(f"the {name} decoder sits on {decoder.kind}, not on a {type(backbone).__name__}{hint}")
    extra = sorted(set(config) - {"decoder", "num_classes", *decoder.settings})
    if extra:
        raise ValueError(f"the {name} decoder has no setting {', '.join(extra)} (its settings: "
                         f"{', '.join(decoder.settings)})")
    return decoder.build(backbone, int(config.get("num_classes", 0)), config)


def is_segmentation_model(model: nn.Module) -> bool:
    """Whether ``model`` is one of the registered decoders' segmentation models (not a classifier)."""
    return getattr(model, "decoder_name", None) in DECODERS
