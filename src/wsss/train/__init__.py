"""Training: configs, the engine (checkpoints, resume, DDP), objectives and validation."""

from .config import DEFAULTS, load_config
from .engine import Trainer, TrainingDiverged

__all__ = ["DEFAULTS", "load_config", "Trainer", "TrainingDiverged"]
