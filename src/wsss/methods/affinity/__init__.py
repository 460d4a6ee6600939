"""PSA's mask step as a trainable stage: AffinityNet on confident pseudo labels, then its random walk."""

from ..registry import Method, preset_folder, register_method
from .objective import AffinityObjective, AffinityOptions

METHOD = register_method(Method(
    name="affinity",
    summary="PSA's AffinityNet: pair affinities trained on confident pseudo labels, for the random walk",
    objective=AffinityObjective,
    options=AffinityOptions,
    presets=preset_folder(__name__),
    paper="Ahn & Kwak, Learning Pixel-level Semantic Affinity with Image-level Supervision (CVPR 2018)",
))
