"""Bottleneck ResNets (50/101/152) with torchvision's parameter names, so ``resnet101-*.pth`` loads strictly.

The layout is torchvision's ``torchvision/models/resnet.py`` (ResNet v1.5: the stride sits on the 3x3 conv):

- ``conv1`` (7x7, stride 2, padding 3, no bias), ``bn1``, ReLU, 3x3 max pool (stride 2, padding 1): stride 4;
- ``layer1 .. layer4`` of :class:`Bottleneck` with ``conv1/bn1`` (1x1), ``conv2/bn2`` (3x3), ``conv3/bn3`` (1x1,
  4x expansion), and in the first block of each layer ``downsample.0`` (1x1 conv, strided) / ``downsample.1`` (BN);
  widths 64/128/256/512 (outputs 256/512/1024/2048); layers 2-4 have stride 2;
- ``fc`` (2048 -> ``num_classes``) after global average pooling.

``replace_stride_with_dilation`` works as torchvision's: a layer whose stride is replaced keeps the resolution and
multiplies the running dilation by 2; its *first* block still uses the previous dilation (the 3x3 of ``layer3.0``
has dilation 1, of ``layer4.0`` dilation 2, the rest of layer3 2 and of layer4 4 with ``(False, True, True)``, the
output stride 8 of DeepLabV2).

As a segmentation backbone build it with ``num_classes=None``: it then has no ``fc``. A torchvision file does
have ``fc.weight``/``fc.bias``; :meth:`ResNet.load_torchvision` removes exactly those two keys (:func:`drop_classifier`),
logs and returns them, and loads the rest with ``strict=True``, so any other missing or unexpected key is an error.
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .weights import describe_mismatch

__all__ = ["Bottleneck", "ResNet", "resnet50", "resnet101", "resnet152", "drop_classifier", "check_state",
           "CLASSIFIER_KEYS", "LAYER_WIDTHS", "MEAN", "STD"]

log = logging.getLogger(__name__)

MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet normalisation, on RGB in [0, 1]
STD = (0.229, 0.224, 0.225)
LAYER_WIDTHS = (64, 128, 256, 512)  # bottleneck widths of layer1..layer4; outputs are 4x these
CLASSIFIER_KEYS = ("fc.weight", "fc.bias")


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (groups 1, base width 64): 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), ReLU
    after the residual add; ``downsample`` is the projection shortcut (``Sequential(conv1x1, BatchNorm2d)``)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)  # only ever applied to tensors created inside this block
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def drop_classifier(state_dict: Mapping[str, Tensor],
                    keys: Sequence[str] = CLASSIFIER_KEYS) -> tuple[dict[str, Tensor], list[str]]:
    """``(state_dict without keys, the keys removed)``: the one filter applied to an ImageNet classifier's file
    before it loads strictly into a headless backbone. Only the listed keys are removed, nothing else."""
    kept = dict(state_dict)
    dropped = [k for k in keys if kept.pop(k, None) is not None]
    return kept, dropped


def check_state(expected: Mapping[str, Tensor], given: Mapping[str, Tensor], what: str) -> None:
    """Raise :class:`~wsss.errors.CheckpointError` naming the missing, unexpected and wrongly shaped keys unless
    ``given`` fits ``expected`` (a model's ``state_dict()``) exactly: ``strict=True`` semantics with a clearer
    message. A missing ``num_batches_tracked`` is allowed: files saved before PyTorch 0.4.1
    (``resnet101-5d3b4d8f.pth``, PSA's converted ResNet-38) have none, and BatchNorm fills it in on load."""
    required = {k: v for k, v in expected.items() if k in given or not k.endswith("num_batches_tracked")}
    problems = describe_mismatch(required, dict(given))
    if problems:
        raise CheckpointError(f"{what} does not fit: " + "; ".join(problems))


class ResNet(nn.Module):
    """torchvision's ``ResNet`` with :class:`Bottleneck` blocks (see the module docstring).

    Args:
        layers: blocks per layer: ``(3, 4, 6, 3)`` ResNet-50, ``(3, 4, 23, 3)`` ResNet-101, ``(3, 8, 36, 3)`` -152.
        num_classes: width of ``fc``; ``None`` builds no ``avgpool``/``fc`` (a segmentation backbone).
        replace_stride_with_dilation: for layer2, layer3, layer4, whether dilation replaces the stride.
        zero_init_residual: zero every ``bn3`` weight (each residual branch starts as the identity), as torchvision's.

    Initialisation is torchvision's: Kaiming-normal (fan out, ReLU) convs, BatchNorm weight 1 and bias 0.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 23, 3), num_classes: int | None = 1000,
                 replace_stride_with_dilation: Sequence[bool] = (False, False, False),
                 zero_init_residual: bool = False):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 block counts, got {tuple(layers)!r}")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation must have 3 entries (layer2, layer3, layer4), "
                             f"got {tuple(replace_stride_with_dilation)!r}")
        self.inplanes = 64
        self.dilation = 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        dilate = (False, *replace_stride_with_dilation)
        stride = 4
        strides: list[int] = []
        for i, (blocks, width) in enumerate(zip(layers, LAYER_WIDTHS)):
            layer_stride = 1 if i == 0 else 2
            self.add_module(f"layer{i + 1}", self._make_layer(width, blocks, layer_stride, dilate[i]))
            if i > 0 and not dilate[i]:
                stride *= 2
            strides.append(stride)
        self.num_classes = num_classes
        if num_classes is not None:
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        self.feature_channels: dict[str, int] = {f"layer{i + 1}": w * Bottleneck.expansion
                                                 for i, w in enumerate(LAYER_WIDTHS)}
        self.feature_strides: dict[str, int] = {f"layer{i + 1}": s for i, s in enumerate(strides)}
        self.output_stride = strides[-1]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        out = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or self.inplanes != out:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, out, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out))
        # torchvision gives the first block the dilation from before this layer, the others the new one.
        layer = [Bottleneck(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = out
        layer += [Bottleneck(out, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layer)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """Each layer's output: ``layer1`` (256 ch, /4), ``layer2`` (512, /8), ``layer3`` (1024) and ``layer4``
        (2048) at the strides in ``feature_strides`` (/16 and /32, or /8 and /8 at output stride 8)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats: dict[str, Tensor] = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            feats[name] = x
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """ImageNet logits ``(B, num_classes)``; a headless backbone (``num_classes=None``) returns ``layer4``."""
        x = self.forward_features(x)["layer4"]
        if self.num_classes is None:
            return x
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def load_torchvision(self, state_dict: Mapping[str, Tensor]) -> list[str]:
        """Load a torchvision checkpoint strictly; returns the keys dropped (``fc.*`` when this model has no ``fc``).

        Raises :class:`~wsss.errors.CheckpointError` naming the missing and unexpected keys when anything else
        does not match (``strict=True`` semantics, with a clearer message).
        """
        dropped: list[str] = []
        if self.num_classes is None:
            state_dict, dropped = drop_classifier(state_dict)
            if dropped:
                log.info("dropped the ImageNet classifier %s: this ResNet is a headless backbone", ", ".join(dropped))
        check_state(self.state_dict(), state_dict, "torchvision ResNet checkpoint")
        self.load_state_dict(state_dict, strict=True)
        return dropped


def resnet50(num_classes: int | None = 1000, replace_stride_with_dilation: Sequence[bool] = (False, False, False),
             zero_init_residual: bool = False) -> ResNet:
    """torchvision's ResNet-50 layout (``resnet50-*.pth``)."""
    return ResNet((3, 4, 6, 3), num_classes, replace_stride_with_dilation, zero_init_residual)


def resnet101(num_classes: int | None = 1000, replace_stride_with_dilation: Sequence[bool] = (False, False, False),
              zero_init_residual: bool = False) -> ResNet:
    """torchvision's ResNet-101 layout (``resnet101-*.pth``); DeepLabV2 uses ``(False, True, True)``, stride 8."""
    return ResNet((3, 4, 23, 3), num_classes, replace_stride_with_dilation, zero_init_residual)


def resnet152(num_classes: int | None = 1000, replace_stride_with_dilation: Sequence[bool] = (False, False, False),
              zero_init_residual: bool = False) -> ResNet:
    """torchvision's ResNet-152 layout (``resnet152-*.pth``)."""
    return ResNet((3, 8, 36, 3), num_classes, replace_stride_with_dilation, zero_init_residual)
