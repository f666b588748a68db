"""AdamW over decoupled text/image parameter groups, and the warmup + cosine-to-floor LR schedule."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from megafusion.config.schema import OptimConfig
from megafusion.model.fusion import LlamaFusion

UNET_PREFIXES = ("unet_down.", "unet_up.")


def _split_unets(groups: dict[str, list]) -> dict[str, list]:
    image = groups.pop("image")
    groups["image"] = [(n, p) for n, p in image if not n.startswith(UNET_PREFIXES)]
    groups["unet"] = [(n, p) for n, p in image if n.startswith(UNET_PREFIXES)]
    return groups


def _lrs(cfg: OptimConfig) -> dict[str, float]:
    return {"text": cfg.lr_text, "image": cfg.lr_image, "unet": cfg.lr_image * cfg.unet_lr_scale}


def _groups(model: LlamaFusion, cfg: OptimConfig) -> dict[str, list]:
    groups = model.grouped_parameters()
    return _split_unets(groups) if cfg.unet_lr_scale != 1.0 else groups


def freeze_zero_lr_groups(model: LlamaFusion, cfg: OptimConfig) -> None:
    """requires_grad=False for every group with lr 0 (what build_optimizer does), callable on its own: the torch
    engine must freeze before it parallelises (FSDP2 and tensor parallel replace the parameters), and builds the
    optimizer only afterwards."""
    lrs = _lrs(cfg)
    for group, named in _groups(model, cfg).items():
        if lrs[group] == 0:
            for _, p in named:
                p.requires_grad_(False)


def build_optimizer(model: LlamaFusion, cfg: OptimConfig) -> torch.optim.AdamW:
    """Groups `text` / `image` (each split into decayed matrices and undecayed norms/vectors). A group with
    lr 0 is frozen: requires_grad=False, so it gets no weight gradients and no optimizer state. With
    unet_lr_scale != 1 the U-Nets (part of the image group) form their own `unet` group."""
    lrs = _lrs(cfg)
    freeze_zero_lr_groups(model, cfg)
    param_groups = []
    for group, named in _groups(model, cfg).items():
        lr = lrs[group]
        if lr == 0:
            continue
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]
        for suffix, params, wd in (("", decay, cfg.weight_decay), ("_no_decay", no_decay, 0.0)):
            if params:
                param_groups.append({"params": params, "lr": lr, "weight_decay": wd, "name": group + suffix})
    if not param_groups:
        raise ValueError("every parameter group has lr 0: nothing to train")
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}
    return torch.optim.AdamW(param_groups, lr=cfg.lr_image, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **kernel[cfg.implementation])


def floor_ratio(cfg: OptimConfig) -> float:
    """lr_min_image / lr_image: the fraction of its own peak lr that every group decays to."""
    return cfg.lr_min_image / cfg.lr_image


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier of a group's peak lr: linear warmup to 1, cosine decay to `floor_ratio(cfg)`, then flat."""
    floor = floor_ratio(cfg)
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.total_steps - cfg.warmup_steps))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> LambdaLR:
    """Warmup + cosine, with a floor per group: each group's lr is its own peak times `lr_factor`, so every group
    decays to the same fraction lr_min_image / lr_image of its peak:

        image  lr_image                  -> lr_min_image
        text   lr_text                   -> lr_text * lr_min_image / lr_image
        unet   lr_image * unet_lr_scale  -> lr_min_image * unet_lr_scale

    lr_min_image is the image group's absolute floor, not every group's: as an absolute floor it would make a
    text group whose peak lies below it rise during "decay", and pull the faster U-Nets down to the image rate."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
