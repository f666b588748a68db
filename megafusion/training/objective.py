"""L = L_LM + lambda * L_DDPM (Transfusion eq. 4): next-token CE on text, noise-prediction MSE on latents.

The objective reports each term as a SUM with its COUNT (CE summed over the text targets, squared error summed over
the latent elements). With a `LossNormalizer` (what training uses) `loss` is normalised by the GLOBAL counts (all
accumulation micro-batches, all data-parallel ranks): L = sum CE / N_text + lambda * sum SE / N_latent, so a
gradient never depends on how documents happened to pack into micro-batches. Without one, `loss` is this
micro-batch's mean objective (inference-style callers, tests)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.model.fusion import LlamaFusion
from megafusion.model.layout import IMAGE, TokenLayout

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossNormalizer:
    """Global denominators of one optimizer step. `scale` undoes the engine's own averaging: DeepSpeed divides the
    loss by the accumulation steps and averages gradients over data-parallel ranks, so it is their product there."""

    num_text_targets: float
    num_latent_elements: float
    scale: float = 1.0

    def loss(self, lm_sum: torch.Tensor, diffusion_sum: torch.Tensor, loss_weight: float) -> torch.Tensor:
        # An empty term (no text targets, or no image, anywhere in the global batch) contributes zero.
        lm = lm_sum / self.num_text_targets if self.num_text_targets else lm_sum * 0.0
        diff = diffusion_sum / self.num_latent_elements if self.num_latent_elements else diffusion_sum * 0.0
        return (lm + loss_weight * diff) * self.scale


def count_loss_terms(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(text targets, latent elements) of a collated micro-batch, before any forward: what the objective will sum
    over. A target counts where the position is a text token with a next-token target (the LM head runs on text
    rows only)."""
    targets = next_token_targets(batch["input_ids"], batch["modality"], batch.get("doc_ids"), batch.get("labels"))
    num_targets = int(((targets != IGNORE_INDEX) & (batch["modality"] != IMAGE)).sum())
    latents = batch.get("latents")
    return num_targets, 0 if latents is None else int(latents.numel())


class LossTerms:
    """Mean views of a result that holds its loss terms as sums with counts."""

    lm_loss_sum: torch.Tensor
    num_text_targets: int
    diffusion_loss_sum: torch.Tensor
    num_latent_elements: int

    @property
    def lm_loss(self) -> torch.Tensor:
        """Mean CE per text target (0 without targets), detached."""
        return mean_of(self.lm_loss_sum, self.num_text_targets).detach()

    @property
    def diffusion_loss(self) -> torch.Tensor:
        """Mean squared error per latent element (0 without images), detached."""
        return mean_of(self.diffusion_loss_sum, self.num_latent_elements).detach()


@dataclass
class LossOutput(LossTerms):
    # The per-micro-batch mean objective (keeps the graph).
    loss: torch.Tensor
    # Sum of the cross-entropy over the text targets, and how many there are (keeps the graph).
    lm_loss_sum: torch.Tensor
    num_text_targets: int
    # Sum of the squared noise-prediction error over every latent element, and how many there are (keeps the graph).
    diffusion_loss_sum: torch.Tensor
    num_latent_elements: int
    num_images: int
    # The batch layout the model ran on (the trainer's FLOP count reads it).
    layout: TokenLayout


def mean_of(total: torch.Tensor, count: int) -> torch.Tensor:
    """total / count, or total itself (a zero that keeps the graph) when nothing was counted."""
    return total / count if count else total


def next_token_targets(
    input_ids: torch.Tensor,
    modality: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Target of position i = token at i+1, or IGNORE_INDEX when i+1 is an image token, starts another packed
    document, is masked in `labels`, or does not exist. BOI/EOI ids (>= vocab) stay targets."""
    src = input_ids if labels is None else labels
    targets = torch.full_like(src, IGNORE_INDEX)
    targets[:, :-1] = src[:, 1:]
    targets[:, :-1][modality[:, 1:] == IMAGE] = IGNORE_INDEX
    if doc_ids is not None:
        targets[:, :-1][doc_ids[:, 1:] != doc_ids[:, :-1]] = IGNORE_INDEX
    return targets


class TransfusionObjective:
    def __init__(self, schedule: DDPMSchedule, loss_weight: float) -> None:
        self.schedule = schedule
        self.loss_weight = loss_weight

    def __call__(
        self,
        model: LlamaFusion,
        input_ids: torch.Tensor,
        modality: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        image_first: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        layout: TokenLayout | None = None,
        normalizer: LossNormalizer | None = None,
    ) -> LossOutput:
        """latents: clean (N, C, H, W) VAE latents, one per image; image_first: (N,) bool, caps their noise.
        layout: the batch's TokenLayout when the caller already built it (then modality, image_ids, doc_ids and
        position_ids are not read); built here from them otherwise. normalizer: the global denominators (see the
        module docstring); None = this micro-batch's means."""
        if layout is None:
            layout = TokenLayout.build(input_ids, modality, image_ids, doc_ids, position_ids,
                                       model.image_config.tokens_per_image)
        noisy = timesteps = noise = None
        num_images = 0 if latents is None else latents.shape[0]
        if num_images:
            if image_first is None:
                image_first = torch.zeros(num_images, dtype=torch.bool, device=latents.device)
            timesteps = self.schedule.sample_timesteps(image_first, generator)
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
            noisy = self.schedule.add_noise(latents, noise, timesteps)
        targets = next_token_targets(input_ids, layout.modality, layout.doc_ids, labels)
        out = model(
            input_ids, layout.modality, layout.image_ids, layout.doc_ids, layout.position_ids, images=noisy,
            timesteps=timesteps, compute_logits=False, lm_targets=targets,
        )
        num_targets = int(out.lm_targets.numel())
        logits = out.lm_logits.float()
        # sum / count is bitwise torch's mean reduction for CE, in the forward and the backward.
        lm_sum = F.cross_entropy(logits, out.lm_targets, reduction="sum") if num_targets else logits.sum() * 0.0
        lm_loss = mean_of(lm_sum, num_targets)

        num_elements = 0
        if num_images:
            pred, target = out.noise_pred.float(), noise.float()
            num_elements = target.numel()
            diffusion_sum = F.mse_loss(pred, target, reduction="sum")
            # torch's own mean reduction for the term that is backpropagated: its backward rounds differently from
            # sum / count, and the per-micro-batch loss must stay bitwise what it was.
            diffusion_loss = F.mse_loss(pred, target)
        else:
            diffusion_sum = diffusion_loss = lm_loss.new_zeros(())
        if normalizer is None:
            loss = lm_loss + self.loss_weight * diffusion_loss
        else:
            loss = normalizer.loss(lm_sum, diffusion_sum, self.loss_weight)
        return LossOutput(loss, lm_sum, num_targets, diffusion_sum, num_elements, num_images, layout)
