"""L = L_LM + lambda * L_DDPM (Transfusion eq. 4): next-token CE on text, noise-prediction MSE on latents.

The objective reports each term as a SUM with its COUNT (CE summed over the text targets, squared error summed over
the latent elements), so a caller can normalise over any set of micro-batches (e.g. the global batch). `loss` is
the per-micro-batch mean objective, lm_sum / num_text_targets + lambda * mean squared error, which is what the
trainer backpropagates."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.model.fusion import LlamaFusion
from megafusion.model.layout import IMAGE, TokenLayout

IGNORE_INDEX = -100


@dataclass
class LossOutput:
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

    @property
    def lm_loss(self) -> torch.Tensor:
        """Mean CE per text target (0 without targets), detached."""
        return mean_of(self.lm_loss_sum, self.num_text_targets).detach()

    @property
    def diffusion_loss(self) -> torch.Tensor:
        """Mean squared error per latent element (0 without images), detached."""
        return mean_of(self.diffusion_loss_sum, self.num_latent_elements).detach()


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
    ) -> LossOutput:
        """latents: clean (N, C, H, W) VAE latents, one per image; image_first: (N,) bool, caps their noise.
        layout: the batch's TokenLayout when the caller already built it (then modality, image_ids, doc_ids and
        position_ids are not read); built here from them otherwise."""
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
        loss = lm_loss + self.loss_weight * diffusion_loss
        return LossOutput(loss, lm_sum, num_targets, diffusion_sum, num_elements, num_images, layout)
