"""Classification heads of the ViT, one module each, named as timm names them (``head.weight``, ``head.bias``).

Each head is the layer itself (a ``Linear`` or a ``Conv2d``), so existing checkpoints load with ``strict=True``,
plus :meth:`classify`, which reads the tokens (after the final norm unless the head sets ``final_norm = False``)
and returns a :class:`HeadOutput`. :data:`HEADS` maps the
``head=`` names of :func:`wsss.models.create_model` to the classes; a new head registers there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class HeadOutput:
    """``logits (B, K)``; ``patch_logits`` a second set (MCT's patch branch); ``cam (B, K, h, w)`` a conv head's map;
    ``features`` the feature map the classifier pools (GETAM's, which its DPT decoder shares)."""

    logits: Tensor
    patch_logits: Tensor | None = None
    cam: Tensor | None = None
    features: Tensor | None = None


def patch_map(tokens: Tensor, grid: tuple[int, int], num_prefix: int) -> Tensor:
    """The patch tokens ``(B, T, D)`` as a ``(B, D, h, w)`` feature map."""
    return tokens[:, num_prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


def _pool(cam: Tensor, pool: str) -> Tensor:
    return cam.amax(dim=(2, 3)) if pool == "max" else cam.mean(dim=(2, 3))


class TokenHead(nn.Linear):
    """A linear classifier on the class token (ViT, DeiT; ACR)."""

    reads_patches = False  # the logits depend on the class token alone

    def __init__(self, dim: int, num_classes: int, pool: str = "avg"):
        super().__init__(dim, num_classes)

    def classify(self, tokens: Tensor, grid: tuple[int, int], num_prefix: int) -> HeadOutput:
        return HeadOutput(self(tokens[:, 0]))


class TokenPreNormHead(TokenHead):
    """ACR's classifier (``cls_head`` of the authors' ``DPT/ACR.py``, methods.md §3): a linear layer on the class
    token of the last block's raw output.

    The authors' forward hook takes block 11's output before the final LayerNorm, and ``cls_head`` reads its class
    token; ``token`` reads the class token after that norm. Same layer and checkpoint keys as ``token``.
    """

    final_norm = False


class GapHead(nn.Linear):
    """A linear classifier on the mean of the patch tokens."""

    reads_patches = True

    def __init__(self, dim: int, num_classes: int, pool: str = "avg"):
        super().__init__(dim, num_classes)

    def classify(self, tokens: Tensor, grid: tuple[int, int], num_prefix: int) -> HeadOutput:
        return HeadOutput(self(tokens[:, num_prefix:].mean(dim=1)))


class ConvHead(nn.Conv2d):
    """A 1x1 convolution on the patch map (a CAM head), pooled by ``pool`` (``avg`` or ``max``) into logits."""

    reads_patches = True

    def __init__(self, dim: int, num_classes: int, pool: str = "avg"):
        super().__init__(dim, num_classes, kernel_size=1)
        self.pool = pool

    def classify(self, tokens: Tensor, grid: tuple[int, int], num_prefix: int) -> HeadOutput:
        cam = self(patch_map(tokens, grid, num_prefix))
        return HeadOutput(_pool(cam, self.pool), cam=cam)


class MCTHead(nn.Conv2d):
    """MCTformer-V2: one class token per class; the logits are each class token's channel mean, and a 3x3 conv on
    the patch map gives the CAM and, pooled, the patch logits.

    Both read the raw output of the last block, as MCTformer-V2 does (its ``forward_features`` never applies the
    final norm): after a LayerNorm every class token's channel mean would be pinned near mean(beta), the same for
    all classes (0 at initialisation).
    """

    reads_patches = True
    tokens_per_class = True
    final_norm = False

    def __init__(self, dim: int, num_classes: int, pool: str = "avg"):
        super().__init__(dim, num_classes, kernel_size=3, padding=1)
        self.pool = pool

    def classify(self, tokens: Tensor, grid: tuple[int, int], num_prefix: int) -> HeadOutput:
        cam = self(patch_map(tokens, grid, num_prefix))
        # The class tokens come first; register tokens (if any) follow them and are not classes.
        return HeadOutput(tokens[:, : self.out_channels].mean(dim=-1), patch_logits=_pool(cam, self.pool), cam=cam)


class GETAMHead(nn.Module):
    """GETAM's classifier (``forward_cls`` of its DPT code, methods.md §2) on block 11's raw output.

    The "project" readout joins each patch token with the class token (Linear 2D -> D, GELU), the patches become a
    map, a 1x1 and a 3x3 stride-2 convolution follow, then global average pooling and a linear layer. So the
    score depends on every patch token and on the class token through every patch, and every block's class-token
    attention row gets a gradient (the ``gap`` head's logits never see the class token's output). ``cam`` is the
    linear layer applied at every position of the stride-2 map (its mean is the logits), resized to the token grid.

    In the authors' DPT model the first three layers are the reassembly of block 11 that the decoder shares
    (``pretrained.act_postprocess4.0.project.0`` -> ``head.readout.0``, ``pretrained.act_postprocess4.3`` ->
    ``head.conv1``, ``pretrained.act_postprocess4.4`` -> ``head.conv2``) and the last is ``cls_head`` -> ``head.fc``.
    """

    reads_patches = True
    final_norm = False  # GETAM's hook takes block 11's output before the final LayerNorm

    def __init__(self, dim: int, num_classes: int, pool: str = "avg"):
        super().__init__()
        self.readout = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=1)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(dim, num_classes)

    def classify(self, tokens: Tensor, grid: tuple[int, int], num_prefix: int) -> HeadOutput:
        patches = tokens[:, num_prefix:]
        joined = torch.cat([patches, tokens[:, :1].expand_as(patches)], dim=-1)
        features = self.conv2(self.conv1(patch_map(self.readout(joined), grid, 0)))  # (B, D, h/2, w/2)
        cam = torch.einsum("kd,bdhw->bkhw", self.fc.weight, features) + self.fc.bias[:, None, None]
        return HeadOutput(cam.mean(dim=(2, 3)), features=features,
                          cam=F.interpolate(cam, size=grid, mode="bilinear", align_corners=False))


class NoHead(nn.Identity):
    """No classifier (``num_classes=0``): the "logits" are the final-normed class token, as timm returns features."""

    reads_patches = False

    def __init__(self, *_: object, **__: object):
        super().__init__()

    def classify(self, tokens: Tensor, grid: tuple[int, int], num_prefix: int) -> HeadOutput:
        return HeadOutput(tokens[:, 0])


HEADS: dict[str, type[nn.Module]] = {"token": TokenHead, "gap": GapHead, "conv": ConvHead, "mct": MCTHead,
                                     "getam": GETAMHead, "token_prenorm": TokenPreNormHead}
