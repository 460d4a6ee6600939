"""Fully connected CRF (Krähenbühl & Koltun) through the optional ``pydensecrf2`` package.

The unary is ``-log(clip(probs, 1e-5, 1))`` (pydensecrf's ``unary_from_softmax``), so the input need
not sum to one over classes: PSA feeds ``[(1 - max cam)^alpha, cams]`` directly. The named parameter
sets are those of methods.md §1.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType, ModuleType

import numpy as np
import torch

from ..errors import ConfigError, WSSSError
from .background import psa_background, with_background

UNARY_CLIP = 1e-5


@dataclass(frozen=True)
class CRFParams:
    """Kernel parameters of a dense CRF: a Gaussian (smoothness) and a bilateral (appearance) kernel."""

    gaussian_sxy: float
    gaussian_compat: float
    bilateral_sxy: float
    bilateral_srgb: float
    bilateral_compat: float
    iterations: int


CRF_PRESETS = MappingProxyType(
    {
        # (a) PSA-style CAM -> label refinement (ACR crf_inference, AReAM tools/dcrf.py).
        "psa": CRFParams(3, 3, 80, 13, 10, 10),
        # (b) GETAM test-time refinement (crf_inference_inf with t = 20 from test.py).
        "getam": CRFParams(3, 3, 83, 5, 4, 20),
        # (c) AReAM segmentation test (seg/tool/imutils.py).
        "aream": CRFParams(4, 3, 83, 5, 3, 10),
    }
)


def crf_params(preset: str | CRFParams) -> CRFParams:
    """A :class:`CRFParams` given as itself or by preset name (``psa``, ``getam``, ``aream``)."""
    if isinstance(preset, CRFParams):
        return preset
    if preset not in CRF_PRESETS:
        raise ConfigError(f"unknown CRF preset {preset!r}; choose one of {sorted(CRF_PRESETS)}")
    return CRF_PRESETS[preset]


def _densecrf() -> ModuleType:
    try:
        import pydensecrf.densecrf as densecrf
    except ImportError as exc:
        raise WSSSError(
            'dense CRF needs the optional package pydensecrf2: pip install "wsss[crf]" (or pip install pydensecrf2)'
        ) from exc
    return densecrf


def dense_crf(image: np.ndarray, probs: np.ndarray, params: str | CRFParams = "psa") -> np.ndarray:
    """Mean-field inference of a dense CRF; returns the ``(C, H, W)`` float32 marginals.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        probs: ``(C, H, W)`` class scores in [0, 1] (clipped at 1e-5 before the log).
        params: a :class:`CRFParams` or a preset name.
    """
    params = crf_params(params)
    image = np.asarray(image)
    probs = np.asarray(probs, dtype=np.float32)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs {probs.shape} must be (C, H, W) matching image {image.shape}")
    num_labels, height, width = probs.shape
    densecrf = _densecrf()
    crf = densecrf.DenseCRF2D(width, height, num_labels)
    unary = -np.log(np.clip(probs, UNARY_CLIP, 1.0)).reshape(num_labels, -1)
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=params.bilateral_sxy,
        srgb=params.bilateral_srgb,
        rgbim=np.ascontiguousarray(image),
        compat=params.bilateral_compat,
    )
    marginals = crf.inference(params.iterations)
    return np.asarray(marginals, dtype=np.float32).reshape(num_labels, height, width)


def psa_crf(image: np.ndarray, maps: np.ndarray, alpha: float, params: str | CRFParams = "psa") -> np.ndarray:
    """PSA's ``crf_with_alpha``: CRF marginals ``(K + 1, H, W)`` of ``[(1 - max maps)^alpha, maps]``."""
    maps_t = torch.from_numpy(np.asarray(maps, dtype=np.float32))
    stacked = with_background(maps_t, psa_background(maps_t, alpha))
    return dense_crf(image, stacked.numpy(), params)
