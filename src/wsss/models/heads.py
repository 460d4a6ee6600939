"""Classification heads of the ViT, one module each, named as timm names them (``head.weight``, ``head.bias``).

Each head is the layer itself (a ``Linear`` or a ``Conv2d``), so existing checkpoints load with ``strict=True``,
plus :meth:`classify`, which reads the tokens (after the final norm unless the head sets ``final_norm = False``)
and returns a :class:`HeadOutput`. :data:`HEADS` maps the
``head=`` names of :func:`wsss.models.create_model` to the classes; a new head registers there.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class HeadOutput:
    """``logits (B, K)``; ``patch_logits`` a second set (MCT's patch branch); ``cam (B, K, h, w)`` a conv head's map."""

    logits: Tensor
    patch_logits: Tensor | None = None
    cam: Tensor | None = None


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


class NoHead(nn.Identity):
    """No classifier (``num_classes=0``): the "logits" are the final-normed class token, as timm returns features."""

    reads_patches = False

    def __init__(self, *_: object, **__: object):
        super().__init__()

    def classify(self, tokens: Tensor, grid: tuple[int, int], num_prefix: int) -> HeadOutput:
        return HeadOutput(tokens[:, 0])


HEADS: dict[str, type[nn.Module]] = {"token": TokenHead, "gap": GapHead, "conv": ConvHead, "mct": MCTHead}
