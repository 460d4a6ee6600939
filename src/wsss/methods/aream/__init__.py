"""AReAM (He et al., arXiv 2305.03112): adaptive re-activation, where the affinity of the shallow blocks supervises
the attention of the deep ones, and the CAM refined by the attention affinity."""

from ..registry import Method, PseudoRecipe, preset_folder, register_method
from .localizer import AReAM
from .objective import AReAMObjective, AReAMOptions

METHOD = register_method(Method(
    name="aream",
    summary="shallow-layer affinity supervises deep-layer attention; CAM refined by the attention affinity",
    maps={"aream": AReAM},
    objective=AReAMObjective,
    options=AReAMOptions,
    pseudo=PseudoRecipe(rule="two_thresholds", params={"high": 0.55, "low": 0.35}, refine="par", scale=0.5,
                        softmax=True),
    presets=preset_folder(__name__),
    paper="He et al., Mitigating Undisciplined Over-Smoothing in Transformer for Weakly Supervised Semantic "
          "Segmentation (arXiv 2305.03112)",
))
