"""`megafusion train`: the Transfusion training loop, with exact resume.

Setup (validation first, then model, engine, loader) is `run_setup`; one micro-batch (forward, backward,
optimizer step) is `step.TrainStep`; the side jobs (non-finite guard, metrics, progress, checkpoints) are
`callbacks`. What is left here is the loop itself."""

from __future__ import annotations

import logging
from typing import Any

import torch

from megafusion.config.loader import config_to_dict
from megafusion.config.schema import MegaFusionConfig
from megafusion.training.callbacks import (
    CallbackList,
    CheckpointCadence,
    EmaUpdate,
    NonFiniteGuard,
    ProgressBar,
    StepMetrics,
)
from megafusion.training.metrics import MetricsLogger
from megafusion.training.preemption import PreemptionGuard
from megafusion.training.profiling import StepProfiler
from megafusion.training.run_checkpoints import CheckpointManager, hash_weights
from megafusion.training.run_setup import build_ema, build_train_loader, check_resume_world, setup_training
from megafusion.training.step import global_normalizer

log = logging.getLogger(__name__)


def train(cfg: MegaFusionConfig, progress: bool = True) -> dict[str, Any]:
    """Runs (or resumes) training; returns the last logged metrics."""
    run = setup_training(cfg)
    ctx, t = run.ctx, cfg.train
    loader = build_train_loader(run)
    generator = torch.Generator().manual_seed(t.seed * 100_003 + run.rank)
    checkpoints = run.checkpoints  # the torch engine brings its own (DCP) manager
    if checkpoints is None:
        base_ref = {"path": str(ctx.base.resolve()), "sha256": hash_weights(ctx.base)}
        checkpoints = CheckpointManager(ctx.output_dir / "checkpoints", t.keep_last, base_ref, run.rank, run.world)
    ema = build_ema(run)
    checkpoints.track_ema(ema)
    micro_batches = run.micro_batches_per_step or t.grad_accum_steps
    step = 0
    if t.resume and (tag := checkpoints.resume_tag()) is not None:  # the newest intact one
        if run.checkpoints is None:  # DeepSpeed: refuse a world size change it cannot reshard, in one line
            check_resume_world(run.engine, checkpoints.dir / tag, run.world)
        step = checkpoints.load(run.engine, loader, generator, tag)
        if run.rank == 0:
            log.warning("resumed from %s at step %d", checkpoints.dir / tag, step)

    guard = NonFiniteGuard(t.max_nonfinite_in_a_row)
    metrics = StepMetrics(
        MetricsLogger(ctx.output_dir, run.rank == 0, t.wandb, t.wandb_project, cfg), run.model, run.engine,
        run.optimizer, guard, world=run.world, grad_accum_steps=t.grad_accum_steps, log_every=t.log_every,
        max_steps=ctx.max_steps, text_trainable=cfg.optim.lr_text > 0, peak_tflops=t.peak_tflops,
        loss_weight=cfg.diffusion.loss_weight, first_record_extra={"precision": run.precision.to_record()},
        batch_replicas=run.batch_replicas,
    )
    cadence = CheckpointCadence(checkpoints, run.engine, loader, generator, t.save_every, ctx.max_steps,
                                {"config": config_to_dict(cfg)})
    callbacks = CallbackList([
        # First: its window covers the step's micro-batches and optimizer step, not the periodic checkpoint save.
        StepProfiler(t.profile_step, ctx.output_dir / "profile", run.rank),
        guard,
        metrics,
        ProgressBar(metrics, ctx.max_steps, step, enabled=progress and run.rank == 0),
        # Before the cadence: a checkpoint holds the average that includes its own step.
        *([EmaUpdate(ema)] if ema is not None else []),
        cadence,
        # Last: a SIGTERM/SIGUSR1 ends the run after this step's metrics and periodic checkpoint.
        PreemptionGuard(cadence.save, already_saved=cadence.due),
    ])
    data = iter(loader)
    try:
        while step < ctx.max_steps:
            callbacks.on_step_start(step + 1)
            # The step's micro-batches are drawn first: the loss is normalised by their global token counts.
            queue = [next(data) for _ in range(micro_batches)]
            normalizer = global_normalizer(queue, run.loss_scale, run.data_group)
            applied = 0
            while applied < micro_batches:
                # A micro-batch dropped as non-finite is replaced by the next one, under the same denominators.
                batch = queue.pop(0) if queue else next(data)
                result = run.step(batch, generator, normalizer)
                callbacks.on_micro_batch(step + 1, batch, result)
                applied += result is not None
            step += 1
            callbacks.on_step_end(step)
    finally:
        callbacks.close()
    return metrics.last_record
