"""How a LlamaFusion model is trained: the Transfusion objective and the decoupled-LR optimizer."""

from megafusion.training.objective import LossOutput, TransfusionObjective, next_token_targets
from megafusion.training.optim import build_lr_scheduler, build_optimizer, lr_factor

__all__ = [
    "LossOutput",
    "TransfusionObjective",
    "build_lr_scheduler",
    "build_optimizer",
    "lr_factor",
    "next_token_targets",
]
