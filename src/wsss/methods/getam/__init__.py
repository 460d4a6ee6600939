"""GETAM (Sun et al., arXiv 2112.02841): gradient-weighted element-wise transformer attention maps, trained end to
end with a segmentation decoder on PAMR-refined, label-completed pseudo labels."""

from ..registry import Method, PseudoRecipe, preset_folder, register_method
from .localizer import GETAM
from .objective import GETAMObjective, GETAMOptions

METHOD = register_method(Method(
    name="getam",
    summary="gradient-weighted element-wise attention maps; end-to-end training with a double backward pass",
    maps={"getam": GETAM},
    objective=GETAMObjective,
    options=GETAMOptions,
    pseudo=PseudoRecipe(rule="completion", params={"cut_threshold": 0.9}, refine="pamr"),
    presets=preset_folder(__name__),
    paper="Sun et al., GETAM: Gradient-weighted Element-wise Transformer Attention Map for Weakly-supervised "
          "Semantic Segmentation (arXiv 2112.02841)",
))
