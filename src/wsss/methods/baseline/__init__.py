"""The baseline every paper is measured against: a classifier fine-tuned on image labels, read with CAM, Grad-CAM
or attention rollout, pseudo labels by a background threshold after PAR."""

from ...localize import CAM, GradCAM, Rollout
from ..registry import Method, PseudoRecipe, preset_folder, register_method
from .objective import Classification

METHOD = register_method(Method(
    name="baseline",
    summary="multi-label classification fine-tuning; CAM, Grad-CAM and attention rollout maps",
    maps={"cam": CAM, "gradcam": GradCAM, "rollout": Rollout},
    own_map="cam",
    objective=Classification,
    pseudo=PseudoRecipe(rule="threshold", params={"bg_threshold": 0.4}, refine="par"),
    presets=preset_folder(__name__),
    paper="Zhou et al., Learning Deep Features for Discriminative Localization (CVPR 2016)",
    aliases=("classification",),
))
