"""One training micro-step: forward (the objective), a cross-rank finiteness check, backward, optimizer step.

The step talks to its engine through three calls (`engine(**inputs)`, `engine.backward(loss)`, `engine.step()`),
which DeepSpeed's engine has; another engine (torch FSDP/TP) needs only an adapter with the same three. The
engine's forward runs `LossModule`: the model and the objective, returning the loss and its sums and counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from megafusion.model.fusion import LlamaFusion
from megafusion.model.layout import TokenLayout
from megafusion.training.objective import LossNormalizer, LossTerms, TransfusionObjective, count_loss_terms

# The collated batch's tensors the objective reads (the loader also yields "keys", "image_ids", ...).
BATCH_TENSORS = ("input_ids", "labels", "latents", "image_first")


class LossModule(nn.Module):
    """What an engine wraps: model + objective, so the engine's forward returns the loss. The model is the
    attribute `model`, which is why checkpoint keys start with "model."."""

    def __init__(self, model: LlamaFusion, objective: TransfusionObjective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        latents: torch.Tensor | None,
        image_first: torch.Tensor | None,
        layout: TokenLayout,
        generator: torch.Generator | None = None,
        normalizer: LossNormalizer | None = None,
    ) -> dict[str, Any]:
        dtype = next(p.dtype for p in self.model.parameters())
        out = self.objective(
            self.model, input_ids, latents=None if latents is None else latents.to(dtype), image_first=image_first,
            labels=labels, generator=generator, layout=layout, normalizer=normalizer,
        )
        # Only `loss` keeps its graph: engines hook every output tensor that has one. Plain ints and tensors only, so
        # ZeRO-3's output walk finds nothing it does not know.
        return {
            "loss": out.loss,
            "lm_loss_sum": out.lm_loss_sum.detach(),
            "num_text_targets": out.num_text_targets,
            "diffusion_loss_sum": out.diffusion_loss_sum.detach(),
            "num_latent_elements": out.num_latent_elements,
            "num_images": out.num_images,
            # Which rows ran without autograd (the FLOP count reads it) and how many targets lie on them.
            "frozen_rows": out.frozen_rows,
            "num_frozen_lm_rows": out.num_frozen_lm_rows,
        }


class StepEngine(Protocol):
    def __call__(self, **inputs: Any) -> dict[str, Any]: ...

    def backward(self, loss: torch.Tensor) -> Any: ...

    def step(self) -> Any: ...


@dataclass
class MicroStep(LossTerms):
    """What one applied micro-batch contributed: its loss terms as sums and counts, and the layout it ran on."""

    loss: torch.Tensor  # the backpropagated objective (globally normalised when a normalizer was given), detached
    lm_loss_sum: torch.Tensor
    num_text_targets: int
    diffusion_loss_sum: torch.Tensor
    num_latent_elements: int
    num_images: int
    layout: TokenLayout
    frozen_rows: torch.Tensor | None = None
    num_frozen_lm_rows: int = 0


def all_ranks_finite(loss: torch.Tensor) -> bool:
    flag = torch.tensor([float(torch.isfinite(loss).item())], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


class TrainStep:
    def __init__(self, engine: StepEngine, tokens_per_image: int) -> None:
        self.engine = engine
        self.tokens_per_image = tokens_per_image

    def __call__(self, batch: dict[str, Any], generator: torch.Generator,
                 normalizer: LossNormalizer | None = None) -> MicroStep | None:
        """Runs one micro-batch. Returns None, with nothing applied, when any rank's loss is non-finite."""
        result = self.forward_backward(batch, generator, normalizer)
        if result is not None:
            self.engine.step()
        return result

    def forward_backward(self, batch: dict[str, Any], generator: torch.Generator,
                         normalizer: LossNormalizer | None = None) -> MicroStep | None:
        """The micro-step without the engine's step (which must follow when this returns a result): lets a caller
        read the accumulated gradients at the accumulation boundary."""
        # Built once here: the model runs on it and the FLOP count reads the same.
        layout = TokenLayout.build(batch["input_ids"], batch["modality"], doc_ids=batch["doc_ids"],
                                   tokens_per_image=self.tokens_per_image)
        out = self.engine(**{k: batch[k] for k in BATCH_TENSORS}, layout=layout, generator=generator,
                          normalizer=normalizer)
        loss = out["loss"]
        if not all_ranks_finite(loss):
            return None  # dropped before backward on every rank alike: no gradient or optimizer state sees it
        self.engine.backward(loss)
        return MicroStep(loss.detach(), out["lm_loss_sum"], out["num_text_targets"], out["diffusion_loss_sum"],
                         out["num_latent_elements"], out["num_images"], layout, out.get("frozen_rows"),
                         out.get("num_frozen_lm_rows", 0))


def global_normalizer(batches: list[dict[str, Any]], engine_scale: float, group: Any = None) -> LossNormalizer:
    """The step's denominators: text targets and latent elements summed over this rank's accumulation
    micro-batches and over the data-parallel ranks (one small all-reduce per optimizer step). group: the
    data-parallel process group (None = all ranks; under tensor parallel only the dp group: the tp ranks of a
    replica hold the same batch)."""
    counts = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        counts += torch.tensor(count_loss_terms(batch), dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, group=group)
    return LossNormalizer(float(counts[0]), float(counts[1]), engine_scale)
