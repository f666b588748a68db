"""How a LlamaFusion model is distributed and memory-managed for training (kept apart from what the model is):
the DeepSpeed config for a TrainConfig, and per-layer activation checkpointing."""

from __future__ import annotations

import json
from typing import Any

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from megafusion.config.loader import ConfigError, resolve_config_path
from megafusion.config.schema import TrainConfig
from megafusion.model.block import FusionBlock
from megafusion.model.fusion import LlamaFusion


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(train: TrainConfig, precision: str | None = None) -> dict[str, Any]:
    """The engine config generated from the run config; a user JSON (train.deepspeed_config) is merged on top.
    precision: what `train.precision` resolved to (fp32 | bf16); with `auto` unresolved, fp32 (validation only)."""
    precision = precision or (train.precision if train.precision != "auto" else "fp32")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        # Our optimizer is torch's AdamW over decoupled groups; ZeRO shards its state all the same.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if train.deepspeed_config:
        try:
            path = resolve_config_path(train.deepspeed_config)  # a file, or a packaged template by name
        except ConfigError as err:
            raise ValueError(f"train.deepspeed_config: {err}") from err
        try:
            user = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"train.deepspeed_config: cannot read {path}: {err}") from err
        config = _merge(config, user)
        # The run config owns these; a JSON that disagrees would silently change the global batch.
        for key, ours in (("train_micro_batch_size_per_gpu", train.micro_batch_size),
                          ("gradient_accumulation_steps", train.grad_accum_steps)):
            if config[key] != ours:
                raise ValueError(f"{path}: '{key}' = {config[key]} disagrees with train config ({ours})")
    return config


def keep_fp32_clip_norm(engine: Any) -> None:
    """DeepSpeed's fp32 ZeRO-0 step clips with clip_grad_norm_ but drops the norm it computed (only its ZeRO and
    bf16 optimizers keep one), so get_global_grad_norm() stayed None there; keep it, at no extra cost."""
    if (engine.gradient_clipping() <= 0 or engine.fp16_enabled() or engine.bfloat16_enabled()
            or engine.zero_optimization()):
        return
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_and_keep_norm() -> None:
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_keep_norm


def apply_layer_checkpointing(model: LlamaFusion) -> None:
    """Recompute each FusionBlock's activations in backward instead of storing them."""
    apply_activation_checkpointing(
        model,
        checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, FusionBlock),
    )


def register_zero3_external_parameters(model: LlamaFusion) -> None:
    """ZeRO-3 gathers a parameter only inside its owning module's forward. A tied LM head reads the embedding
    table from LlamaFusion.forward itself, so that table is declared as used there too."""
    import deepspeed

    if model.lm_head is None:
        deepspeed.zero.register_external_parameter(model, model.embed_tokens.weight)
