"""`megafusion train`: the Transfusion training loop on a DeepSpeed engine.

Everything that can be checked without doing work (config, paths, shapes, tokenizer/model agreement, the
DeepSpeed config) is checked first; then the model is built, wrapped and trained with exact resume."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from megafusion.config.loader import config_to_dict
from megafusion.config.schema import MegaFusionConfig
from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.model.fusion import LlamaFusion
from megafusion.model.layout import TokenLayout
from megafusion.training.checkpointing import CheckpointManager, hash_weights
from megafusion.training.metrics import MetricsLogger, peak_memory_bytes
from megafusion.training.objective import TransfusionObjective, next_token_targets
from megafusion.training.optim import build_lr_scheduler, build_optimizer
from megafusion.training.parallelize import (
    apply_layer_checkpointing,
    deepspeed_config,
    register_zero3_external_parameters,
)

log = logging.getLogger(__name__)

BATCH_TENSORS = ("input_ids", "modality", "doc_ids", "labels", "latents", "image_first")


class NonFiniteLossError(RuntimeError):
    pass


class TransfusionStep(nn.Module):
    """What the DeepSpeed engine wraps: model + objective, so the engine's forward returns the loss."""

    def __init__(self, model: LlamaFusion, objective: TransfusionObjective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, input_ids, modality, doc_ids, labels, latents, image_first, generator=None):
        dtype = next(p.dtype for p in self.model.parameters())
        out = self.objective(
            self.model, input_ids, modality, latents=None if latents is None else latents.to(dtype),
            image_first=image_first, doc_ids=doc_ids, labels=labels, generator=generator,
        )
        return out.loss, torch.stack((out.lm_loss.float(), out.diffusion_loss.float()))


@dataclass
class RunContext:
    base: Path
    shards: Path
    tokenizer: Path
    output_dir: Path
    max_steps: int


def prepare_run(cfg: MegaFusionConfig) -> RunContext:
    """All cheap validation, before any model is built; errors name the config key."""
    from megafusion.checkpoint.builtin_bases import resolve_base
    from megafusion.checkpoint.fetch_base import default_cache_dir
    from megafusion.data_pipeline.demo.pixel_latents import resolve_shards
    from megafusion.data_pipeline.shard_format import read_index

    if not cfg.model.base:
        raise ValueError("model.base: required (an HF Llama dir, a .gguf file, builtin:tiny-llama or smollm2-135m)")
    if not cfg.data.shards:
        raise ValueError("data.shards: required (a directory written by `megafusion precompute-latents`)")
    base = resolve_base(cfg.model.base)
    shards = resolve_shards(cfg.data.shards, default_cache_dir())
    index = read_index(shards)
    expected = [cfg.image.latent_channels, cfg.image.latent_size, cfg.image.latent_size]
    if list(index["latent_shape"]) != expected:
        raise ValueError(
            f"{shards}/index.json: latents are {index['latent_shape']}, but image.latent_channels/latent_size "
            f"say {expected}"
        )
    tokenizer = Path(cfg.data.tokenizer) if cfg.data.tokenizer else (base if base.is_dir() else base.parent)
    max_steps = cfg.train.max_steps or cfg.optim.total_steps
    deepspeed_config(cfg.train)  # raises on a bad or inconsistent DeepSpeed JSON
    if cfg.train.zero_stage == 3 and cfg.model.routing == "triton":
        # The grouped GEMM reads both weight sets directly; ZeRO-3 gathers a weight only when its module is called.
        raise ValueError("model.routing: 'triton' does not work with train.zero_stage=3; use routing 'index' or 'auto'")
    return RunContext(base, shards, tokenizer, Path(cfg.train.output_dir), max_steps)


def _init_distributed() -> tuple[int, int]:
    import deepspeed

    if "RANK" not in os.environ:  # a plain single-process run: give DeepSpeed a one-rank group
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


@dataclass
class TrainingSetup:
    cfg: MegaFusionConfig
    ctx: RunContext
    rank: int
    world: int
    model: LlamaFusion
    engine: Any
    optimizer: torch.optim.Optimizer


def setup_training(cfg: MegaFusionConfig) -> TrainingSetup:
    """Validates, joins the process group, builds the model with its frozen text path and the DeepSpeed engine."""
    import deepspeed

    from megafusion.data_pipeline.tokenizer import load_tokenizer

    ctx = prepare_run(cfg)
    rank, world = _init_distributed()
    torch.manual_seed(cfg.train.seed)  # identical U-Net init on every rank
    model = LlamaFusion.from_llama(ctx.base, cfg.model.separation, cfg.image, cfg.unet,
                                   attention=cfg.model.attention, routing=cfg.model.routing)
    tok = load_tokenizer(ctx.tokenizer)
    if tok.vocab_size > model.arch.vocab_size:
        raise ValueError(f"data.tokenizer {ctx.tokenizer}: {tok.vocab_size} tokens exceed the model's "
                         f"vocabulary of {model.arch.vocab_size}")
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.optim)
    if cfg.train.activation_checkpointing:
        apply_layer_checkpointing(model)
    objective = TransfusionObjective(DDPMSchedule(cfg.diffusion), cfg.diffusion.loss_weight)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=TransfusionStep(model, objective), optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg.train),
    )
    if engine.zero_optimization_stage() == 3:
        register_zero3_external_parameters(model)
    return TrainingSetup(cfg, ctx, rank, world, model, engine, optimizer)


def forward_backward(engine: Any, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One micro-step. Returns None, with nothing applied, when any rank's loss is non-finite."""
    loss, parts = engine(**{k: batch[k] for k in BATCH_TENSORS}, generator=generator)
    if _all_reduce([float(torch.isfinite(loss).item())], dist.ReduceOp.MIN)[0] != 1.0:
        return None  # dropped before backward on every rank alike: no gradient or optimizer state sees it
    engine.backward(loss)
    engine.step()
    return loss.detach(), parts


def train(cfg: MegaFusionConfig, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) training; returns the last logged metrics."""
    from megafusion.data_pipeline.loader import LatentSequenceStream, build_loader
    from megafusion.training.flops import count_step_flops, infer_text_needs_input_grad, num_lm_rows

    run = setup_training(cfg)
    ctx, rank, world, model, engine, optimizer = run.ctx, run.rank, run.world, run.model, run.engine, run.optimizer
    stream = LatentSequenceStream(ctx.shards, ctx.tokenizer, cfg.image.tokens_per_image, model.boi_id,
                                  model.eoi_id, cfg.data, rank=rank, world_size=world)
    loader = build_loader(stream, cfg.train.micro_batch_size)
    generator = torch.Generator().manual_seed(cfg.train.seed * 100_003 + rank)
    base_ref = {"path": str(ctx.base.resolve()), "sha256": hash_weights(ctx.base)}
    ckpt = CheckpointManager(ctx.output_dir / "checkpoints", cfg.train.keep_last, base_ref, rank, world)

    step = 0
    if cfg.train.resume and ckpt.latest_tag() is not None:
        tag = ckpt.latest_tag()
        step = ckpt.load(engine, loader, generator, tag)
        if rank == 0:
            log.warning("resumed from %s at step %d", ckpt.dir / tag, step)
    logger = MetricsLogger(ctx.output_dir, rank == 0, cfg.train.wandb, cfg.train.wandb_project, cfg)
    bar = tqdm(total=ctx.max_steps, initial=step, desc="train", unit="step", disable=not progress or rank != 0)
    data = iter(loader)
    nonfinite_in_a_row = nonfinite_total = 0
    record: dict[str, Any] = {}
    text_frozen = cfg.optim.lr_text == 0
    try:
        while step < ctx.max_steps:
            start = time.perf_counter()
            sums = {"loss": 0.0, "lm": 0.0, "diff": 0.0, "text_tokens": 0, "image_tokens": 0, "flops": 0}
            micro = 0
            while micro < cfg.train.grad_accum_steps:
                batch = next(data)
                result = forward_backward(engine, batch, generator)
                if result is None:
                    nonfinite_in_a_row += 1
                    nonfinite_total += 1
                    log.warning("non-finite loss at step %d (keys %s); skipped", step + 1, batch["keys"][:4])
                    if nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                        raise NonFiniteLossError(
                            f"{nonfinite_in_a_row} non-finite losses in a row at step {step + 1} "
                            f"(train.max_nonfinite_in_a_row); last batch keys {batch['keys'][:4]}"
                        )
                    continue
                nonfinite_in_a_row = 0
                micro += 1
                loss, parts = result
                layout = TokenLayout.build(batch["input_ids"], batch["modality"], doc_ids=batch["doc_ids"],
                                           tokens_per_image=cfg.image.tokens_per_image)
                targets = next_token_targets(batch["input_ids"], batch["modality"], batch["doc_ids"], batch["labels"])
                is_image = batch["modality"] == 1
                sums["flops"] += count_step_flops(
                    model, layout, num_lm_rows(targets, batch["modality"]), text_trainable=not text_frozen,
                    text_needs_input_grad=infer_text_needs_input_grad(model, layout, batch["input_ids"],
                                                                      not text_frozen),
                ).total
                sums["loss"] += loss.item()
                sums["lm"] += parts[0].item()
                sums["diff"] += parts[1].item()
                sums["text_tokens"] += int((~is_image & (batch["labels"] != -100)).sum())
                sums["image_tokens"] += int(is_image.sum())
            step += 1
            elapsed = time.perf_counter() - start
            if step % cfg.train.log_every == 0 or step == ctx.max_steps:
                record = _step_record(cfg, step, sums, elapsed, world, engine, optimizer, nonfinite_total)
                logger.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lm=f"{record['lm_loss']:.3f}",
                                diff=f"{record['diffusion_loss']:.3f}")
            bar.update(1)
            if step % cfg.train.save_every == 0 or step == ctx.max_steps:
                ckpt.save(engine, step, loader, generator, {"config": config_to_dict(cfg)})
    finally:
        bar.close()
        logger.close()
    return record


def _step_record(cfg: MegaFusionConfig, step: int, sums: dict, elapsed: float, world: int, engine: Any,
                 optimizer: torch.optim.Optimizer, nonfinite_total: int) -> dict[str, Any]:
    g = _all_reduce([sums["loss"], sums["lm"], sums["diff"], sums["text_tokens"], sums["image_tokens"],
                     sums["flops"]])
    elapsed = _all_reduce([elapsed], dist.ReduceOp.MAX)[0]
    n = cfg.train.grad_accum_steps * world
    tflops = g[5] / elapsed / 1e12
    return {
        "step": step,
        "loss": g[0] / n,
        "lm_loss": g[1] / n,
        "diffusion_loss": g[2] / n,
        **{f"lr_{grp['name']}": grp["lr"] for grp in optimizer.param_groups if not grp["name"].endswith("_no_decay")},
        "grad_norm": _grad_norm(engine),
        "text_tokens_per_s": g[3] / elapsed,
        "image_tokens_per_s": g[4] / elapsed,
        "step_time_s": elapsed,
        "tflops": tflops,
        "mfu": tflops / (cfg.train.peak_tflops * world) if cfg.train.peak_tflops else None,
        "peak_memory_gb": peak_memory_bytes() / 2**30,
        "nonfinite_skipped": nonfinite_total,
    }


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    norm = float(norm)
    return norm if math.isfinite(norm) else None
