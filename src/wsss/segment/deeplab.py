"""The two DeepLab segmentation networks that CNN-based WSSS papers train on their pseudo labels.

- :class:`DeepLabV2`: DeepLab v2's ASPP (four parallel 3x3 convolutions with dilation 6, 12, 18, 24, each mapping
  2048 channels straight to the class logits, summed) on a torchvision-named ResNet-101 at output stride 8
  (dilation 2 in ``layer3``, 4 in ``layer4``). The ASPP's names follow kazuto1011/deeplab-pytorch
  (``libs/models/deeplabv2.py``: ``aspp.stages.c0 .. c3``, weights N(0, 0.01), biases 0); the backbone sits under
  ``backbone.`` with torchvision's names (:mod:`wsss.models.resnet`). Like that code (and the Caffe original),
  BatchNorm is frozen by default.
- :class:`ResNet38DeepLab`: the ResNet-38 DeepLab of MCTformer's ``seg/network/resnet38_seg.py``, which TransCAM
  and AReAM (``main_seg.sh``: ``--network resnet38_seg``) use unchanged: PSA's ResNet-38 (flat names, as it
  subclasses PSA's ``resnet38d.Net``) with ``fc8_seg_conv1`` (3x3, dilation 12, 4096 -> 512, bias, ReLU) and
  ``fc8_seg_conv2`` (3x3, dilation 12, 512 -> classes, bias) on ``conv6``; both weights Xavier-uniform, the biases
  PyTorch's default. There is no dropout in this head (the backbone's ``b6``/``b7`` have theirs).

Both return logits at stride 8 (``ceil(H / 8) x ceil(W / 8)``); ``forward(x, upsample=True)`` (or
:func:`upsample_logits`) resizes them bilinearly (``align_corners=False``, as AReAM's training loop) to the input.
Built with ``upsample=True`` that is their default, and they are segmentation models like the ViT ones: the
``segmentation`` objective's decoders ``deeplabv2`` and ``deeplab_resnet38``
(:func:`wsss.models.decoders.make_segmenter` builds them so), with ``model(x)`` the logits at the input size,
``patch_size`` the stride the test-time views are rounded to (8), ``num_classes``, and ``config()`` the settings a
checkpoint's spec stores to rebuild them.
``param_groups()`` splits the trainable parameters into the pretrained backbone and the new head for the
"x10 learning rate on the head" recipe (AReAM: ``get_1x_lr_params``/``get_10x_lr_params`` by ``'fc8'`` in the
name; kazuto1011: ASPP weights x10, biases x20); ``head_keys`` gives the same split to
:func:`wsss.train.optim.param_groups`.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ..models.resnet import ResNet, resnet101
from ..models.resnet38 import ResNet38

__all__ = ["ParamGroups", "ASPP", "DeepLabV2", "ResNet38DeepLab", "upsample_logits", "deeplabv2_resnet101",
           "deeplab_resnet38", "ASPP_RATES"]

ASPP_RATES = (6, 12, 18, 24)  # DeepLab v2's ASPP-L


class ParamGroups(NamedTuple):
    """A model's trainable parameters: the pretrained ``backbone`` and the freshly initialised ``head``."""

    backbone: list[nn.Parameter]
    head: list[nn.Parameter]

    def optimizer_groups(self, lr: float, head_lr_mult: float = 10.0,
                         head_bias_lr_mult: float | None = None) -> list[dict]:
        """Optimiser parameter groups: the backbone at ``lr``, the head at ``lr * head_lr_mult``.

        With ``head_bias_lr_mult`` the head's biases form a third group at ``lr * head_bias_lr_mult``
        (kazuto1011's DeepLabV2 recipe: 10x weights, 20x biases). Each group records its ``lr_mult`` as
        :func:`wsss.train.optim.param_groups` does, so a schedule can rescale it.
        """
        groups = [{"params": self.backbone, "lr": lr, "lr_mult": 1.0}]
        if head_bias_lr_mult is None:
            groups.append({"params": self.head, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult})
        else:
            weights = [p for p in self.head if p.ndim > 1]
            biases = [p for p in self.head if p.ndim <= 1]
            groups.append({"params": weights, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult})
            groups.append({"params": biases, "lr": lr * head_bias_lr_mult, "lr_mult": head_bias_lr_mult})
        return [g for g in groups if g["params"]]


def _split(model: nn.Module, head_keys: tuple[str, ...]) -> ParamGroups:
    backbone, head = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:  # frozen BatchNorm and stem parameters belong to no group
            (head if name.startswith(head_keys) else backbone).append(p)
    return ParamGroups(backbone, head)


def _upsample(model: DeepLabV2 | ResNet38DeepLab, upsample: bool | None) -> bool:
    return model.upsample if upsample is None else upsample


def upsample_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of ``(B, C, h, w)`` logits to ``size`` ``(H, W)`` (``align_corners=False``)."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """DeepLab v2's atrous spatial pyramid pooling: ``sum_i conv_i(x)``, ``conv_i`` a 3x3 conv with bias, dilation
    and padding ``rates[i]``, straight to the class logits. The branches are ``stages.c0 .. stages.c{n-1}``."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = ASPP_RATES):
        super().__init__()
        if not rates:
            raise ValueError("ASPP needs at least one rate")
        self.rates = tuple(rates)
        self.stages = nn.Module()  # a plain container, so the names are stages.c0, ... as kazuto1011's
        for i, rate in enumerate(self.rates):
            conv = nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate, bias=True)
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)
            self.stages.add_module(f"c{i}", conv)

    def forward(self, x: Tensor) -> Tensor:
        branches = iter(self.stages.children())
        out = next(branches)(x)
        for conv in branches:
            out = out + conv(x)
        return out


def _freeze_batchnorm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


class DeepLabV2(nn.Module):
    """DeepLab v2 (ASPP-L) on a headless torchvision ResNet.

    Args:
        num_classes: output channels (21 for VOC with background).
        backbone: a :class:`~wsss.models.resnet.ResNet` built with ``num_classes=None``; default ResNet-101 with
            ``replace_stride_with_dilation=(False, True, True)`` (output stride 8).
        rates: the ASPP dilations.
        freeze_bn: keep every BatchNorm in eval mode with frozen affine parameters (kazuto1011's ``freeze_bn`` and
            its optimiser, which holds only conv parameters): segmentation batches are too small for batch
            statistics.
        upsample: the default of ``forward``'s ``upsample``: True gives the logits at the input size, as every
            segmentation model of the toolkit.
    """

    head_keys: tuple[str, ...] = ("aspp.",)
    decoder_name = "deeplabv2"

    def __init__(self, num_classes: int, backbone: ResNet | None = None, rates: Sequence[int] = ASPP_RATES,
                 freeze_bn: bool = True, upsample: bool = False):
        super().__init__()
        if backbone is None:
            backbone = resnet101(num_classes=None, replace_stride_with_dilation=(False, True, True))
        if backbone.num_classes is not None:
            raise ValueError("DeepLabV2 needs a headless backbone: build the ResNet with num_classes=None")
        self.num_classes = num_classes
        self.backbone = backbone
        self.aspp = ASPP(backbone.feature_channels["layer4"], num_classes, rates)
        self.freeze_bn = freeze_bn
        self.upsample = upsample
        self.output_stride = backbone.output_stride
        if freeze_bn:
            _freeze_batchnorm(self.backbone)

    @property
    def patch_size(self) -> int:
        """The output stride: test-time views are resized to multiples of it."""
        return self.output_stride

    def config(self) -> dict[str, Any]:
        """The settings a checkpoint's spec stores (:func:`wsss.models.decoders.make_segmenter` rebuilds it)."""
        return {"decoder": self.decoder_name, "num_classes": self.num_classes, "rates": list(self.aspp.rates),
                "freeze_bn": self.freeze_bn}

    def train(self, mode: bool = True) -> "DeepLabV2":
        """``nn.Module.train``; with ``freeze_bn`` the BatchNorms go back to eval mode and stay frozen."""
        super().train(mode)
        if self.freeze_bn:
            _freeze_batchnorm(self.backbone)
        return self

    def forward(self, x: Tensor, upsample: bool | None = None) -> Tensor:
        """Logits ``(B, num_classes, h, w)`` at the backbone's output stride, or at ``x``'s size with ``upsample``
        (None: the model's own ``upsample``)."""
        logits = self.aspp(self.backbone.forward_features(x)["layer4"])
        return upsample_logits(logits, x.shape[-2:]) if _upsample(self, upsample) else logits

    def param_groups(self) -> ParamGroups:
        """Trainable parameters: ``backbone.*`` (1x) and ``aspp.*`` (the head)."""
        return _split(self, self.head_keys)

    def load_backbone(self, state_dict: Mapping[str, Tensor]) -> list[str]:
        """Load torchvision ImageNet weights (``resnet101-*.pth``) into the backbone strictly; returns the
        classifier keys dropped (``fc.weight``, ``fc.bias``). The ASPP keeps its initialisation."""
        return self.backbone.load_torchvision(state_dict)


class ResNet38DeepLab(ResNet38):
    """MCTformer/TransCAM/AReAM's ``resnet38_seg.Net``: PSA's ResNet-38 and two dilated 3x3 convs on ``conv6``.

    The state dict is PSA's ResNet-38 keys plus ``fc8_seg_conv1.{weight,bias}`` and ``fc8_seg_conv2.{weight,bias}``,
    so the authors' trained segmentation checkpoints load with ``strict=True``; ImageNet weights load into the
    backbone part with :meth:`load_backbone`. ``freeze_bn``/``freeze_stem`` are :class:`ResNet38`'s (PSA's
    ``train()``, which this network inherits in the authors' code); ``upsample`` is ``forward``'s default, as in
    :class:`DeepLabV2`.
    """

    head_keys: tuple[str, ...] = ("fc8_seg_conv1.", "fc8_seg_conv2.")
    decoder_name = "deeplab_resnet38"

    def __init__(self, num_classes: int, freeze_bn: bool = True, freeze_stem: bool = True,
                 head_channels: int = 512, head_dilation: int = 12, upsample: bool = False):
        super().__init__(freeze_bn=freeze_bn, freeze_stem=freeze_stem)
        self.num_classes = num_classes
        self.freeze_stem = freeze_stem
        self.head_channels = head_channels
        self.head_dilation = head_dilation
        self.upsample = upsample
        self.fc8_seg_conv1 = nn.Conv2d(4096, head_channels, 3, padding=head_dilation, dilation=head_dilation,
                                       bias=True)
        self.fc8_seg_conv2 = nn.Conv2d(head_channels, num_classes, 3, padding=head_dilation,
                                       dilation=head_dilation, bias=True)
        # Only the weights: the authors leave the biases at PyTorch's default initialisation.
        nn.init.xavier_uniform_(self.fc8_seg_conv1.weight)
        nn.init.xavier_uniform_(self.fc8_seg_conv2.weight)

    @property
    def patch_size(self) -> int:
        """The output stride: test-time views are resized to multiples of it."""
        return self.output_stride

    def config(self) -> dict[str, Any]:
        """The settings a checkpoint's spec stores (:func:`wsss.models.decoders.make_segmenter` rebuilds it)."""
        return {"decoder": self.decoder_name, "num_classes": self.num_classes, "head_channels": self.head_channels,
                "head_dilation": self.head_dilation, "freeze_bn": self.freeze_bn, "freeze_stem": self.freeze_stem}

    def forward(self, x: Tensor, upsample: bool | None = None) -> Tensor:  # type: ignore[override]
        """Logits ``(B, num_classes, ceil(H/8), ceil(W/8))``, or at ``x``'s size with ``upsample`` (None: the
        model's own ``upsample``)."""
        conv6 = self.forward_features(x)["conv6"]
        logits = self.fc8_seg_conv2(F.relu(self.fc8_seg_conv1(conv6)))
        return upsample_logits(logits, x.shape[-2:]) if _upsample(self, upsample) else logits

    def param_groups(self) -> ParamGroups:
        """Trainable parameters: everything but ``fc8_*`` (1x) and the ``fc8_seg_conv*`` head (AReAM's 10x)."""
        return _split(self, self.head_keys)

    def load_backbone(self, state_dict: Mapping[str, Tensor]) -> list[str]:
        """Load PSA's ImageNet ResNet-38 (``resnet38d.pth``) or VOC classifier (``res38_cls.pth``, AReAM's
        initialisation) strictly into every non-head parameter; returns the classifier keys dropped (``fc8.weight``).

        The file must hold exactly the backbone's keys (``num_batches_tracked`` may be absent, as in PSA's
        converted file); the head keeps its initialisation. Anything else raises
        :class:`~wsss.errors.CheckpointError` (the authors' ``strict=False`` would silently skip a mismatch).
        """
        return self.load_psa(state_dict)


def deeplabv2_resnet101(num_classes: int, rates: Sequence[int] = ASPP_RATES, freeze_bn: bool = True) -> DeepLabV2:
    """DeepLab v2 on ResNet-101 at output stride 8 (torchvision names under ``backbone.``)."""
    return DeepLabV2(num_classes, resnet101(num_classes=None, replace_stride_with_dilation=(False, True, True)),
                     rates, freeze_bn)


def deeplab_resnet38(num_classes: int, freeze_bn: bool = True, freeze_stem: bool = True) -> ResNet38DeepLab:
    """AReAM's ``resnet38_seg`` DeepLab on PSA's ResNet-38."""
    return ResNet38DeepLab(num_classes, freeze_bn=freeze_bn, freeze_stem=freeze_stem)
