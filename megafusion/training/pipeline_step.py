"""The training step under pipeline parallel (parallel.pp > 1): the loop's micro-batches are collected until a
schedule call's worth (parallel.pp_microbatches) is there, then run through megafusion.parallel.pipeline.

Every stage needs the same per-micro-batch data, so it is prepared here on every rank of a replica alike: each
micro-batch draws its timesteps and noise from its data stream's generator in the objective's order (so a pipelined
run draws exactly what one process draws), and is brought to the fixed shapes the schedule was set up for: rows of
data.max_len tokens (the packer's), and the images padded with zeros to `max_images` per micro-batch. Padding
images carry no loss: the last stage counts only the images the token layout holds."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from megafusion.model.layout import TokenLayout
from megafusion.parallel.pipeline import PipelineRunner
from megafusion.training.objective import (
    IGNORE_INDEX,
    LossNormalizer,
    TransfusionObjective,
    count_loss_terms,
    next_token_targets,
)
from megafusion.training.step import MicroStep, StepEngine, all_ranks_finite
from megafusion.training.torch_engine import StreamTrainStep

log = logging.getLogger(__name__)


def prepare_micro_batch(batch: dict[str, Any], generator: torch.Generator, objective: TransfusionObjective,
                        max_images: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The stage inputs of one collated micro-batch: input_ids, modality, doc_ids, targets (B, S); noisy images,
    noise (max_images, C, H, W) and timesteps (max_images,), real images first."""
    latents = batch.get("latents")
    n = 0 if latents is None else latents.shape[0]
    if n > max_images:
        raise ValueError(f"a micro-batch holds {n} images, more than the {max_images} the pipeline pads to")
    out = {"input_ids": batch["input_ids"], "modality": batch["modality"].long(), "doc_ids": batch["doc_ids"],
           "targets": next_token_targets(batch["input_ids"], batch["modality"], batch["doc_ids"], batch["labels"])}
    if n:
        latents = latents.to(dtype)
        image_first = batch.get("image_first")
        if image_first is None:
            image_first = torch.zeros(n, dtype=torch.bool)
        # The objective's draws, in its order: timesteps, then noise.
        timesteps = objective.schedule.sample_timesteps(image_first, generator)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        noisy = objective.schedule.add_noise(latents, noise, timesteps)
        weights = objective.schedule.loss_weights(timesteps)
        weights = torch.ones(n) if weights is None else weights
    else:
        timesteps = torch.zeros(0, dtype=torch.long)
        weights = torch.zeros(0)
        noise = noisy = None
    # Padding images weigh 0 (they carry no loss either way: the last stage reads only the real ones).
    out["image_weights"] = _pad(weights.float(), max_images)
    out["timesteps"] = _pad(timesteps.long(), max_images)
    # What the last stage compares the U-Net up with: the noise, or v (DDPMSchedule.target).
    out["noise"] = _pad(None if noise is None else objective.schedule.target(latents, noise, timesteps), max_images)
    out["noisy"] = _pad(noisy, max_images)
    return out


def _pad(t: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    if t is None:
        return None
    return torch.cat((t, t.new_zeros(rows - t.shape[0], *t.shape[1:])))


def stack_micro_batches(prepared: list[dict[str, torch.Tensor | None]], image_shape: tuple[int, ...],
                        max_images: int) -> dict[str, torch.Tensor]:
    """One tensor per key, micro-batches along dim 0 (the schedule splits them back); a micro-batch without
    images contributes zero padding."""
    out = {}
    for key in ("input_ids", "modality", "doc_ids", "targets", "timesteps", "image_weights", "noise", "noisy"):
        parts = [p[key] if p[key] is not None else torch.zeros(max_images, *image_shape) for p in prepared]
        out[key] = torch.cat(parts)
    return out


class PipelineTrainStep(StreamTrainStep):
    """TrainStep for parallel.pp > 1. Each call takes one micro-batch; the call that completes a schedule's worth
    runs the pipeline (forward and backward of all of them). Calls return what each micro-batch contributed to the
    metrics: counts at once, the loss sums (known after the schedule) with the completing call. The engine's step()
    is called once per micro-batch as the loop expects (the optimizer steps at the accumulation boundary, which
    always completes a schedule call)."""

    def __init__(self, engine: StepEngine, tokens_per_image: int, runner: PipelineRunner,
                 objective: TransfusionObjective, *, max_images: int, image_shape: tuple[int, ...],
                 rows: int, max_len: int, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__(engine, tokens_per_image)
        self.runner, self.objective = runner, objective
        self.max_images, self.image_shape, self.rows, self.max_len = max_images, image_shape, rows, max_len
        self.autocast_dtype = autocast_dtype
        self._pending: list[dict[str, torch.Tensor | None]] = []

    def __call__(self, batch: dict[str, Any], generator: torch.Generator,
                 normalizer: LossNormalizer | None = None) -> MicroStep | None:
        assert self.streams is not None and normalizer is not None
        ids = batch["input_ids"]
        if tuple(ids.shape) != (self.rows, self.max_len):
            raise ValueError(f"pipeline micro-batches must be train.micro_batch_size x data.max_len = "
                             f"{self.rows} x {self.max_len} tokens (fixed stage shapes), got {tuple(ids.shape)}")
        self._pending.append(prepare_micro_batch(batch, self.streams.generator(batch["stream"]), self.objective,
                                                 self.max_images))
        layout = TokenLayout.build(ids, batch["modality"], doc_ids=batch["doc_ids"],
                                   tokens_per_image=self.tokens_per_image)
        num_text, num_elements = count_loss_terms(batch)
        num_images = 0 if batch.get("latents") is None else batch["latents"].shape[0]
        lm_sum = diffusion_sum = torch.zeros((), dtype=torch.float64)
        if len(self._pending) == self.runner.plan.microbatches:
            lm_sum, diffusion_sum = self._run(normalizer)
        self.engine.step()
        return MicroStep(torch.zeros(()), lm_sum, num_text, diffusion_sum, num_elements, num_images, layout)

    def _run(self, normalizer: LossNormalizer) -> tuple[torch.Tensor, torch.Tensor]:
        x = stack_micro_batches(self._pending, self.image_shape, self.max_images)
        self._pending = []
        ctx = (torch.autocast(self.runner.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
               else contextlib.nullcontext())
        with ctx:
            sums = self.runner.step(x["input_ids"], x["noisy"], x, normalizer, self.objective.loss_weight)
        total = sums.sum(0)
        if not all_ranks_finite(total.sum()):
            # Its backward has already run: the step's gradients so far are dropped (the optimizer still steps).
            log.warning("non-finite loss in a pipeline schedule call; the step's gradients so far are dropped")
            for p in self.engine.module.parameters():
                p.grad = None
            return torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        return total[0], total[1]


__all__ = ["IGNORE_INDEX", "PipelineTrainStep", "prepare_micro_batch", "stack_micro_batches"]
