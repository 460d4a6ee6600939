"""Binary morphological opening with a square structuring element, in torch (max-pooling).

Erosion is ``-maxpool(-x)`` with the outside of the image counted as foreground, dilation is
``maxpool(x)`` with the outside counted as background (OpenCV's default borders), so objects touching
the border are not eaten away.

For an even size ``k`` the square cannot be centred. The textbook opening (scipy, scikit-image)
dilates with the reflected square, so the result is the union of all k x k squares that fit inside
the mask. OpenCV's ``morphologyEx(MORPH_OPEN)`` instead uses the same anchor ``k // 2`` for both steps,
which shifts the result by one pixel towards the bottom-right for even ``k``; ``opencv_anchor=True``
reproduces that (GETAM's denoising step uses OpenCV with a 10x10 kernel). Odd sizes agree either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _window_max(x: torch.Tensor, size: int, before: int, fill: float) -> torch.Tensor:
    """Max over the window ``[y - before, y - before + size)`` (same in x), outside filled with ``fill``."""
    after = size - 1 - before
    padded = F.pad(x, [before, after, before, after], mode="constant", value=fill)
    return F.max_pool2d(padded, kernel_size=size, stride=1)


def binary_opening(mask: torch.Tensor, size: int, opencv_anchor: bool = False) -> torch.Tensor:
    """Open a boolean ``(H, W)`` or ``(B, H, W)`` mask with a ``size x size`` square; returns a bool mask."""
    if size < 1:
        raise ValueError(f"opening size must be >= 1, got {size}")
    if mask.ndim not in (2, 3):
        raise ValueError(f"mask must be (H, W) or (B, H, W), got {tuple(mask.shape)}")
    x = mask.to(torch.float32).reshape(-1, 1, *mask.shape[-2:])
    anchor = size // 2
    eroded = -_window_max(-x, size, before=anchor, fill=-1.0)
    # The textbook dilation reflects the square: window [y - (k - 1 - anchor), y + anchor].
    dilate_before = anchor if opencv_anchor else size - 1 - anchor
    opened = _window_max(eroded, size, before=dilate_before, fill=0.0)
    return opened.reshape(mask.shape) > 0.5
