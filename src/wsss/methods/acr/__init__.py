"""ACR (Sun et al., arXiv 2308.04321): all-pairs consistency of attention between a crop and its flip, and
class-wise maps from class-token gradients refined by the attention affinity."""

from ..registry import Method, PseudoRecipe, preset_folder, register_method
from .localizer import ACR
from .objective import ACRObjective, ACROptions

METHOD = register_method(Method(
    name="acr",
    summary="all-pairs attention consistency between two views; class-token-gradient maps with affinity",
    maps={"acr": ACR},
    objective=ACRObjective,
    options=ACROptions,
    # The maps already carry ACR's affinity refinement; PSA's background (1 - max)^alpha then a dense CRF is the
    # mask step the authors' infer_cam writes (alpha 1 and 12, methods.md §3).
    pseudo=PseudoRecipe(rule="psa", params={"alpha": 12.0}, refine="crf", crf="psa"),
    presets=preset_folder(__name__),
    paper="Sun et al., All-pairs Consistency Learning for Weakly Supervised Semantic Segmentation (arXiv 2308.04321)",
))
