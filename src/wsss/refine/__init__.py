"""Refining localisation maps with the image: PAMR, PAR, dense CRF and attention-affinity random walks.

Everything works on batched ``(B, C, H, W)`` tensors on any device except the dense CRF, which runs on
the CPU through the optional ``pydensecrf2`` package.
"""

from .affinity import propagate, refine_with_affinity, transition_matrix
from .background import psa_background, with_background
from .crf import CRF_PRESETS, CRFParams, crf_params, dense_crf, psa_crf
from .pamr import PAMR, PAMR_DILATIONS, pamr, pamr_kernel
from .par import PAR, PAR_DILATIONS, par, par_kernel, par_positional_kernel
from .refiner import REFINEMENTS, Refiner, make_refiner

__all__ = [
    "CRF_PRESETS",
    "CRFParams",
    "PAMR",
    "PAMR_DILATIONS",
    "PAR",
    "PAR_DILATIONS",
    "REFINEMENTS",
    "Refiner",
    "crf_params",
    "dense_crf",
    "make_refiner",
    "pamr",
    "pamr_kernel",
    "par",
    "par_kernel",
    "par_positional_kernel",
    "propagate",
    "psa_background",
    "psa_crf",
    "refine_with_affinity",
    "transition_matrix",
    "with_background",
]
