"""The wide ResNet-38 of PSA (``jiwoon-ahn/psa``, ``network/resnet38d.py``), with PSA's parameter names.

This is the backbone of PSA's classifier and AffinityNet and of the DeepLab that MCTformer, TransCAM and AReAM
train on their pseudo labels (:mod:`wsss.segment.deeplab`). Names and shapes are exactly PSA's, so the ImageNet
weights everyone uses (``ilsvrc-cls_rna-a1_cls1000_ep-0001.params`` turned into a ``resnet38d.pth`` state dict by
PSA's ``convert_mxnet_to_torch``, which drops ``linear1000``) load with ``strict=True``:

- ``conv1a``: 3x3 conv 3 -> 64, stride 1, no bias;
- ``b2, b2_1, b2_2`` (128), ``b3, b3_1, b3_2`` (256), ``b4, b4_1 .. b4_5`` (512): :class:`ResBlock`, the first of
  each stage with stride 2, so the stride is 8 after ``b4``;
- ``b5, b5_1, b5_2``: :class:`ResBlock` 512 -> 1024 with a 512-wide middle, stride 1; ``b5``'s first conv has
  dilation 1, every other 3x3 conv of the stage dilation 2;
- ``b6`` (1024 -> 2048, Dropout2d 0.3) and ``b7`` (2048 -> 4096, Dropout2d 0.5): :class:`BottleneckBlock`
  (PSA's ``ResBlock_bot``), 3x3 dilation 4;
- ``bn7``: the final BatchNorm on 4096 channels.

Every block is pre-activation (BN-ReLU before each conv, the shortcut projection ``conv_branch1`` reading the
BN-ReLU'd input). :meth:`ResNet38.forward_features` is PSA's ``forward_as_dict``: ``conv4`` (512 ch: ``b5``'s
BN-ReLU'd input), ``conv5`` (1024 ch: ``b6``'s) and ``conv6`` (4096 ch: ``relu(bn7(b7))``), all at stride 8.

PSA's ``train()`` keeps every BatchNorm in eval mode with frozen affine parameters, and freezes the modules in
``not_training`` (``conv1a``); :class:`ResNet38` does the same by default (``freeze_bn``, ``not_training``).
Inputs are RGB in [0, 1] normalised by the ImageNet mean and std (PSA's ``Normalize``: :data:`MEAN`, :data:`STD`).
"""

from __future__ import annotations

import logging
from typing import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from .resnet import check_state, drop_classifier

__all__ = ["ResBlock", "BottleneckBlock", "ResNet38", "resnet38d", "MEAN", "STD", "FEATURE_CHANNELS",
           "PSA_CLASSIFIER_KEYS",
           "OUTPUT_STRIDE"]

MEAN = (0.485, 0.456, 0.406)  # PSA's Normalize, on RGB in [0, 1]
STD = (0.229, 0.224, 0.225)
FEATURE_CHANNELS = {"conv4": 512, "conv5": 1024, "conv6": 4096}
# The 1x1 classifier of PSA's resnet38_cls.Net, in its VOC classifier res38_cls.pth (AReAM's segmentation init).
PSA_CLASSIFIER_KEYS = ("fc8.weight",)

log = logging.getLogger(__name__)
OUTPUT_STRIDE = 8


class ResBlock(nn.Module):
    """PSA's ``ResBlock``: pre-activation, two 3x3 convs (``in -> mid -> out``), projection when the shape changes.

    ``conv_branch2a`` carries the stride and ``first_dilation`` (default: ``dilation``), ``conv_branch2b1`` the
    ``dilation``; padding equals the dilation, so a stride-1 block keeps the size. ``conv_branch1`` (1x1, strided)
    exists only when ``in != out`` or ``stride != 1``; otherwise the shortcut is the raw input.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1,
                 first_dilation: int | None = None, dilation: int = 1):
        super().__init__()
        self.same_shape = in_channels == out_channels and stride == 1
        first = dilation if first_dilation is None else first_dilation
        # Registration order is PSA's, so state_dict() lists the keys in the same order as its model.
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride, padding=first, dilation=first,
                                       bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        self.conv_branch1 = (None if self.same_shape
                             else nn.Conv2d(in_channels, out_channels, 1, stride, bias=False))

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, relu(bn_branch2a(x)))``: PSA's ``forward(x, get_x_bn_relu=True)``."""
        preact = F.relu(self.bn_branch2a(x))
        shortcut = x if self.conv_branch1 is None else self.conv_branch1(preact)
        branch = self.conv_branch2a(preact)
        branch = self.conv_branch2b1(F.relu(self.bn_branch2b1(branch)))
        return shortcut + branch, preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class BottleneckBlock(nn.Module):
    """PSA's ``ResBlock_bot``: pre-activation 1x1 -> 3x3 (dilated) -> 1x1 with widths ``out/4, out/2, out``.

    ``Dropout2d(dropout)`` (``dropout_2b1``, ``dropout_2b2``) sits before the 3x3 and the last 1x1 conv. PSA's
    forward always applies ``conv_branch1`` (both uses change the width), so the projection is required here.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        if in_channels == out_channels and stride == 1:
            raise ValueError("PSA's bottleneck block always projects its shortcut: in and out must differ or stride > 1")
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_channels // 4, out_channels // 2, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward_with_preact(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(output, relu(bn_branch2a(x)))``: PSA's ``forward(x, get_x_bn_relu=True)``."""
        preact = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(preact)
        branch = self.conv_branch2a(preact)
        branch = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(branch))))
        branch = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(branch))))
        return shortcut + branch, preact

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_preact(x)[0]


class ResNet38(nn.Module):
    """PSA's ``resnet38d.Net`` (see the module docstring for the layout); ``forward(x)`` returns ``conv6``.

    Args:
        freeze_bn: as PSA's ``train()``: every BatchNorm stays in eval mode (running statistics are never updated)
            and its weight and bias do not train. False gives ordinary trainable BatchNorm.
        freeze_stem: put ``conv1a`` in ``not_training`` as PSA does (its weight does not train).

    ``not_training`` is a list of modules whose parameters are frozen; a subclass may append to it (PSA's
    AffinityNet adds ``b2, b2_1, b2_2``): :meth:`train` re-applies it, as PSA's does. Parameters are also frozen at
    construction, so an optimiser built before the first ``train()`` call already sees them as frozen.
    """

    feature_channels: dict[str, int] = FEATURE_CHANNELS
    output_stride: int = OUTPUT_STRIDE
    # A subclass's own layers beyond PSA's ResNet-38 (a segmentation head): load_psa leaves them as they are.
    head_keys: tuple[str, ...] = ()

    def __init__(self, freeze_bn: bool = True, freeze_stem: bool = True):
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)

        self.b2 = ResBlock(64, 128, 128, stride=2)
        self.b2_1 = ResBlock(128, 128, 128)
        self.b2_2 = ResBlock(128, 128, 128)

        self.b3 = ResBlock(128, 256, 256, stride=2)
        self.b3_1 = ResBlock(256, 256, 256)
        self.b3_2 = ResBlock(256, 256, 256)

        self.b4 = ResBlock(256, 512, 512, stride=2)
        self.b4_1 = ResBlock(512, 512, 512)
        self.b4_2 = ResBlock(512, 512, 512)
        self.b4_3 = ResBlock(512, 512, 512)
        self.b4_4 = ResBlock(512, 512, 512)
        self.b4_5 = ResBlock(512, 512, 512)

        # From here on the resolution stays at /8: dilation replaces the stride.
        self.b5 = ResBlock(512, 512, 1024, stride=1, first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(1024, 512, 1024, dilation=2)
        self.b5_2 = ResBlock(1024, 512, 1024, dilation=2)

        self.b6 = BottleneckBlock(1024, 2048, stride=1, dilation=4, dropout=0.3)
        self.b7 = BottleneckBlock(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)

        self.freeze_bn = freeze_bn
        # A plain list attribute: nn.Module would register a ModuleList's entries a second time in state_dict().
        self.not_training: list[nn.Module] = [self.conv1a] if freeze_stem else []
        self._apply_freezing()

    def _apply_freezing(self) -> None:
        for module in self.not_training:
            for p in module.parameters():
                p.requires_grad_(False)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    for p in m.parameters():
                        p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNet38":
        """``nn.Module.train``, then PSA's freezing: ``not_training`` and (with ``freeze_bn``) every BatchNorm's
        parameters frozen and the BatchNorms back in eval mode. Dropout follows ``mode`` as usual."""
        super().train(mode)
        self._apply_freezing()
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """PSA's ``forward_as_dict``: ``conv4`` ``(B, 512, h, w)``, ``conv5`` ``(B, 1024, h, w)`` and ``conv6``
        ``(B, 4096, h, w)``, where ``h = ceil(H / 8)``, ``w = ceil(W / 8)``."""
        x = self.conv1a(x)
        for block in (self.b2, self.b2_1, self.b2_2, self.b3, self.b3_1, self.b3_2,
                      self.b4, self.b4_1, self.b4_2, self.b4_3, self.b4_4, self.b4_5):
            x = block(x)
        x, conv4 = self.b5.forward_with_preact(x)
        x = self.b5_2(self.b5_1(x))
        x, conv5 = self.b6.forward_with_preact(x)
        conv6 = F.relu(self.bn7(self.b7(x)))
        return {"conv4": conv4, "conv5": conv5, "conv6": conv6}

    def forward(self, x: Tensor) -> Tensor:
        """``conv6``, the 4096-channel stride-8 map (PSA's ``forward``)."""
        return self.forward_features(x)["conv6"]

    def load_psa(self, state_dict: Mapping[str, Tensor]) -> list[str]:
        """Load PSA's ResNet-38 weights strictly into every parameter but the ``head_keys`` (which keep theirs).

        ``state_dict`` is PSA's ImageNet ``resnet38d.pth`` or its VOC classifier ``res38_cls.pth``, whose
        ``fc8.weight`` (:data:`PSA_CLASSIFIER_KEYS`) is dropped and returned; ``num_batches_tracked`` may be absent,
        as in PSA's converted file. Any other missing, unexpected or wrongly shaped key raises
        :class:`~wsss.errors.CheckpointError` (the authors' ``strict=False`` would skip it silently).
        """
        state, dropped = drop_classifier(state_dict, PSA_CLASSIFIER_KEYS)
        if dropped:
            log.info("dropped PSA's classifier %s: this ResNet-38 has no classifier", ", ".join(dropped))
        own = self.state_dict()
        trunk = {k: v for k, v in own.items() if not k.startswith(self.head_keys)}
        check_state(trunk, state, "PSA ResNet-38 checkpoint")
        self.load_state_dict({**state, **{k: v for k, v in own.items() if k not in trunk}}, strict=True)
        return dropped


def resnet38d(freeze_bn: bool = True, freeze_stem: bool = True) -> ResNet38:
    """PSA's ResNet-38 (:class:`ResNet38`); load ``resnet38d.pth`` (or ``res38_cls.pth``) with
    :meth:`ResNet38.load_psa`."""
    return ResNet38(freeze_bn=freeze_bn, freeze_stem=freeze_stem)
