"""An exponential moving average of the trainable weights (train.ema_decay), kept in fp32 beside training and
saved in every checkpoint, so that a resumed run continues the same average and `megafusion export` can write
the averaged weights instead of the last step's.

Hand-written rather than diffusers' EMAModel: that one averages in the parameters' own dtype (bf16 under a bf16
engine, too coarse to move by 1% of a difference per step) and keeps an unnamed list, where a checkpoint needs
parameter names."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def ema_decay_at(decay: float, step: int) -> float:
    """The decay applied after optimizer step `step` (1-based): the usual warm-up (1 + n) / (10 + n) with
    n = step - 1, capped at `decay`. Step 1 copies the weights (decay 0), so the average never holds the random
    U-Net initialisation, and early steps are not outweighed by a long-decayed start."""
    n = step - 1
    return 0.0 if n <= 0 else min(decay, (1 + n) / (10 + n))


class WeightEMA:
    """fp32 shadow copies of `named_parameters` (the trainable ones; under FSDP/TP each rank averages its own
    shards, which are DTensors like the parameters). `update(step)` after every optimizer step."""

    def __init__(self, named_parameters: Iterable[tuple[str, nn.Parameter]], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay: must be in (0, 1) to average, got {decay}")
        self.decay = decay
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        for name, param in named_parameters:
            if param.requires_grad:
                self.names.append(name)
                self.params.append(param)
        with torch.no_grad():
            self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.params]

    @torch.no_grad()
    def restart(self) -> None:
        """The average restarts at the current weights."""
        for shadow, param in zip(self.shadow, self.params, strict=True):
            shadow.copy_(param.detach())

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = ema_decay_at(self.decay, step)
        current = [p.detach().to(torch.float32) for p in self.params]
        torch._foreach_lerp_(self.shadow, current, 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Parameter name -> averaged weight (references, not copies)."""
        return dict(zip(self.names, self.shadow, strict=True))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        missing = [n for n in self.names if n not in state]
        unknown = [n for n in state if n not in set(self.names)]
        if missing or unknown:
            raise ValueError(f"{source}: its weight average does not match this model's trainable parameters "
                             f"(missing {missing[:3]}, unknown {unknown[:3]})")
        for name, shadow in zip(self.names, self.shadow, strict=True):
            if tuple(state[name].shape) != tuple(shadow.shape):
                raise ValueError(f"{source}: averaged '{name}' has shape {tuple(state[name].shape)}, the parameter "
                                 f"{tuple(shadow.shape)}")
            shadow.copy_(state[name])
