"""The training loop's side jobs, one small callback each: the non-finite guard, step metrics (losses, throughput,
FLOPs/MFU), the progress bar and the checkpoint cadence.

The loop calls, in list order: `on_step_start(step)` before the first micro-batch of optimizer step `step`
(1-based), `on_micro_batch(step, batch, result)` after each micro-batch (`result` is None when it was dropped as
non-finite), `on_step_end(step)` once the step is complete, and `close()` at the end, also after an error."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from megafusion.model.fusion import LlamaFusion
from megafusion.model.layout import IMAGE
from megafusion.training.ema import WeightEMA
from megafusion.training.flops import count_step_flops, infer_text_needs_input_grad
from megafusion.training.metrics import MetricsLogger, peak_memory_bytes
from megafusion.training.run_checkpoints import CheckpointManager
from megafusion.training.step import MicroStep

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class Callback:
    def on_step_start(self, step: int) -> None:
        pass

    def on_micro_batch(self, step: int, batch: dict[str, Any], result: MicroStep | None) -> None:
        pass

    def on_step_end(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class CallbackList(Callback):
    """Calls every callback in order; `close` reaches all of them even if one fails."""

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)

    def on_step_start(self, step: int) -> None:
        for cb in self.callbacks:
            cb.on_step_start(step)

    def on_micro_batch(self, step: int, batch: dict[str, Any], result: MicroStep | None) -> None:
        for cb in self.callbacks:
            cb.on_micro_batch(step, batch, result)

    def on_step_end(self, step: int) -> None:
        for cb in self.callbacks:
            cb.on_step_end(step)

    def close(self) -> None:
        errors = []
        for cb in self.callbacks:
            try:
                cb.close()
            except Exception as err:  # noqa: BLE001 (close the rest, then re-raise the first)
                errors.append(err)
        if errors:
            raise errors[0]


class NonFiniteGuard(Callback):
    """Counts dropped micro-batches; `max_in_a_row` of them one after another stop the run."""

    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def on_micro_batch(self, step: int, batch: dict[str, Any], result: MicroStep | None) -> None:
        if result is not None:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        keys = batch["keys"][:4]
        log.warning("non-finite loss at step %d (keys %s); skipped", step, keys)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"{self.in_a_row} non-finite losses in a row at step {step} "
                f"(train.max_nonfinite_in_a_row); last batch keys {keys}"
            )


def _all_reduce(values: list[float], op: Any = dist.ReduceOp.SUM) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op)
    return t.tolist()


class StepMetrics(Callback):
    """Per-step record (losses normalised by the global batch's token counts, as they were optimised) written by
    `logger` every `log_every` steps and at the last step: losses, lr per group, grad norm, tokens/s, TFLOP/s, MFU,
    peak memory and the guard's count of dropped micro-batches. The FLOPs of a micro-batch are counted on the
    layout the step ran on."""

    def __init__(self, logger: MetricsLogger, model: LlamaFusion, engine: Any, optimizer: torch.optim.Optimizer,
                 guard: NonFiniteGuard, *, world: int, grad_accum_steps: int, log_every: int, max_steps: int,
                 text_trainable: bool, peak_tflops: float, loss_weight: float,
                 first_record_extra: dict[str, Any] | None = None, batch_replicas: int = 1) -> None:
        self.logger, self.model, self.engine, self.optimizer, self.guard = logger, model, engine, optimizer, guard
        # Tensor-parallel ranks run the same micro-batch (each a 1/tp share of its FLOPs): the sums over all ranks
        # count it batch_replicas times. The losses are ratios of two such sums and need no correction.
        self.batch_replicas = batch_replicas
        self.world, self.grad_accum_steps, self.peak_tflops = world, grad_accum_steps, peak_tflops
        self.log_every, self.max_steps, self.text_trainable = log_every, max_steps, text_trainable
        self.loss_weight = loss_weight
        # Run facts (e.g. the precision choice and its probe) that the first record of this process carries.
        self._first_extra = dict(first_record_extra or {})
        self.last_record: dict[str, Any] = {}
        self.logged = False  # whether the step that just ended was logged
        self._start = time.perf_counter()
        self._sums = self._zero()
        # Latest cumulative (samples skipped, shards damaged) of each data reader this rank has heard from.
        self._health: dict[int, tuple[int, int]] = {}

    @staticmethod
    def _zero() -> dict[str, float]:
        return dict.fromkeys(("lm_sum", "text_targets", "diff_sum", "latent_elements", "text_tokens", "image_tokens",
                              "flops"), 0.0)

    def on_step_start(self, step: int) -> None:
        self._start = time.perf_counter()
        self._sums = self._zero()

    def on_micro_batch(self, step: int, batch: dict[str, Any], result: MicroStep | None) -> None:
        for reader, skipped, damaged in batch.get("reader_health", []):
            self._health[reader] = (max(skipped, self._health.get(reader, (0, 0))[0]),
                                    max(damaged, self._health.get(reader, (0, 0))[1]))
        if result is None:
            return
        layout, is_image = result.layout, batch["modality"] == IMAGE
        needs_grad = infer_text_needs_input_grad(self.model, layout, batch["input_ids"], self.text_trainable)
        flops = count_step_flops(self.model, layout, result.num_text_targets, self.text_trainable, needs_grad,
                                 result.frozen_rows, result.num_frozen_lm_rows)
        s = self._sums
        s["flops"] += flops.total
        s["lm_sum"] += result.lm_loss_sum.item()
        s["text_targets"] += result.num_text_targets
        s["diff_sum"] += result.diffusion_loss_sum.item()
        s["latent_elements"] += result.num_latent_elements
        s["text_tokens"] += int((~is_image & (batch["labels"] != -100)).sum())
        s["image_tokens"] += int(is_image.sum())

    def on_step_end(self, step: int) -> None:
        self.logged = step % self.log_every == 0 or step == self.max_steps
        if not self.logged:
            return
        elapsed = _all_reduce([time.perf_counter() - self._start], dist.ReduceOp.MAX)[0]
        s = self._sums
        s["samples_skipped"] = sum(h[0] for h in self._health.values())
        s["shards_damaged"] = sum(h[1] for h in self._health.values())
        keys = ("lm_sum", "text_targets", "diff_sum", "latent_elements", "text_tokens", "image_tokens", "flops",
                "samples_skipped", "shards_damaged")
        g = {k: v / self.batch_replicas for k, v in zip(keys, _all_reduce([s[k] for k in keys]), strict=True)}
        lm_loss = g["lm_sum"] / g["text_targets"] if g["text_targets"] else 0.0
        diffusion_loss = g["diff_sum"] / g["latent_elements"] if g["latent_elements"] else 0.0
        tflops = g["flops"] / elapsed / 1e12
        self.last_record = {
            "step": step,
            "loss": lm_loss + self.loss_weight * diffusion_loss,
            "lm_loss": lm_loss,
            "diffusion_loss": diffusion_loss,
            **{f"lr_{grp['name']}": grp["lr"] for grp in self.optimizer.param_groups
               if not grp["name"].endswith("_no_decay")},
            "grad_norm": _grad_norm(self.engine),
            "text_tokens_per_s": g["text_tokens"] / elapsed,
            "image_tokens_per_s": g["image_tokens"] / elapsed,
            "step_time_s": elapsed,
            "tflops": tflops,
            "mfu": tflops / (self.peak_tflops * self.world) if self.peak_tflops else None,
            "peak_memory_gb": peak_memory_bytes() / 2**30,
            "nonfinite_skipped": self.guard.total,
            # Cumulative since the run started (carried through resumes in the loader state).
            "samples_skipped": int(g["samples_skipped"]),
            "shards_damaged": int(g["shards_damaged"]),
        }
        if self._first_extra:
            self.last_record.update(self._first_extra)
            self._first_extra = {}
        self.logger.log(self.last_record)

    def close(self) -> None:
        self.logger.close()


def _grad_norm(engine: Any) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    norm = float(norm)
    return norm if math.isfinite(norm) else None


class ProgressBar(Callback):
    """A tqdm bar over optimizer steps, showing the last logged losses."""

    def __init__(self, metrics: StepMetrics, total: int, initial: int, enabled: bool) -> None:
        self.metrics = metrics
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled)

    def on_step_end(self, step: int) -> None:
        if self.metrics.logged:
            r = self.metrics.last_record
            self.bar.set_postfix(loss=f"{r['loss']:.4f}", lm=f"{r['lm_loss']:.3f}", diff=f"{r['diffusion_loss']:.3f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class EmaUpdate(Callback):
    """Moves the weight average after every optimizer step."""

    def __init__(self, ema: WeightEMA) -> None:
        self.ema = ema

    def on_step_end(self, step: int) -> None:
        self.ema.update(step)


class CheckpointCadence(Callback):
    """Saves a run checkpoint every `every` steps and at the last step."""

    def __init__(self, checkpoints: CheckpointManager, engine: Any, loader: Any, generator: torch.Generator,
                 every: int, max_steps: int, extra: dict[str, Any]) -> None:
        self.checkpoints, self.engine, self.loader, self.generator = checkpoints, engine, loader, generator
        self.every, self.max_steps, self.extra = every, max_steps, extra

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    def save(self, step: int) -> None:
        self.checkpoints.save(self.engine, step, self.loader, self.generator, self.extra)

    def on_step_end(self, step: int) -> None:
        if self.due(step):
            self.save(step)
