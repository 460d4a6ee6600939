"""wsss: weakly supervised semantic segmentation with vision transformers.

Data flows ``data -> models -> localize -> refine -> pseudo -> segment -> evaluate``;
``train`` wraps the objectives and ``cli`` exposes every step as a ``wsss`` subcommand.
"""

__version__ = "0.1.0"
