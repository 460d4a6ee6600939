"""MCTformer-V2 (Xu et al., Multi-class Token Transformer for Weakly Supervised Semantic Segmentation, CVPR 2022):
one class token per class, a 3x3 conv CAM on the patch tokens, both trained by multi-label classification, and the
fused map. It is AReAM's baseline: the same model and recipe without the re-activation loss."""

from ..baseline.objective import Classification
from ..registry import Method, PseudoRecipe, preset_folder, register_method
from .localizer import MCTformerV2

METHOD = register_method(Method(
    name="mctformer",
    summary="one class token per class and a conv CAM (head=mct); fused map = CAM x class attention, refined by "
            "the all-block patch affinity",
    maps={"mctformer": MCTformerV2},
    objective=Classification,
    # AReAM's recipe (two thresholds and PAR), so that the two methods differ only in the training loss.
    pseudo=PseudoRecipe(rule="two_thresholds", params={"high": 0.55, "low": 0.35}, refine="par", scale=0.5,
                        softmax=True),
    presets=preset_folder(__name__),
    paper="Xu et al., Multi-class Token Transformer for Weakly Supervised Semantic Segmentation (CVPR 2022)",
))
