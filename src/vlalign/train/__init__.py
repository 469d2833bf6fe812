"""Multi-stage contrastive training (see INTERFACES §7)."""

from vlalign.train.checkpoint import CheckpointStore, load_checkpoint, model_from_checkpoint, save_checkpoint
from vlalign.train.config import StageConfig
from vlalign.train.loop import TrainCallback, train_stage

__all__ = [
    "CheckpointStore",
    "StageConfig",
    "TrainCallback",
    "load_checkpoint",
    "model_from_checkpoint",
    "save_checkpoint",
    "train_stage",
]
