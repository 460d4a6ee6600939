"""WSSS methods as plug-ins: one folder and one :class:`Method` registration each.

Built in: ``baseline`` (classification fine-tuning; CAM, Grad-CAM, attention rollout), ``getam``, ``acr``, ``aream``
and the ``segmentation`` stage. Shared building blocks (PAR, PAMR, CRF, affinity, the confusion matrix) live in their
stage packages; a method folder holds only what is the method's own. ``wsss methods`` lists what is registered.
"""

from .registry import (
    REGISTRY,
    Method,
    MethodOptions,
    NoOptions,
    Objective,
    PseudoRecipe,
    get_method,
    preset_folder,
    register_method,
    unregister_method,
)

__all__ = ["REGISTRY", "Method", "MethodOptions", "NoOptions", "Objective", "PseudoRecipe", "get_method",
           "preset_folder", "register_method", "unregister_method"]
