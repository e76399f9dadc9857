"""Generic training loops: CE pretraining and preference alignment (DPO, SFT, the graded objective) of
any `rwasym.Model`, with resumable checkpoints (`loops`), and TRL's DPOTrainer as a backend for the same
settings and output layout (`trl_backend`). The losses themselves live in `rwasym.objectives`."""

from .loops import (
    AlignConfig,
    TrainConfig,
    TrainResult,
    UpdateTracker,
    align,
    log_spaced_steps,
    lr_at,
    pretrain,
    read_update_sum,
    save_checkpoint,
)
from .trl_backend import align_trl

__all__ = [
    "AlignConfig",
    "TrainConfig",
    "TrainResult",
    "UpdateTracker",
    "align",
    "align_trl",
    "log_spaced_steps",
    "lr_at",
    "pretrain",
    "read_update_sum",
    "save_checkpoint",
]
