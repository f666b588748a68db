"""L = L_LM + lambda * L_DDPM (Transfusion eq. 4): next-token CE on text, noise-prediction MSE on latents."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.model.fusion import LlamaFusion
from megafusion.model.layout import IMAGE

IGNORE_INDEX = -100


@dataclass
class LossOutput:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    diffusion_loss: torch.Tensor
    num_text_targets: int
    num_images: int


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
    ) -> LossOutput:
        """latents: clean (N, C, H, W) VAE latents, one per image; image_first: (N,) bool, caps their noise."""
        if modality is None:
            modality = torch.zeros_like(input_ids)
        noisy = timesteps = noise = None
        num_images = 0 if latents is None else latents.shape[0]
        if num_images:
            if image_first is None:
                image_first = torch.zeros(num_images, dtype=torch.bool, device=latents.device)
            timesteps = self.schedule.sample_timesteps(image_first, generator)
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
            noisy = self.schedule.add_noise(latents, noise, timesteps)
        targets = next_token_targets(input_ids, modality, doc_ids, labels)
        out = model(
            input_ids, modality, image_ids, doc_ids, position_ids, images=noisy, timesteps=timesteps,
            compute_logits=False, lm_targets=targets,
        )
        num_targets = int(out.lm_targets.numel())
        logits = out.lm_logits.float()
        lm_loss = F.cross_entropy(logits, out.lm_targets) if num_targets else logits.sum() * 0.0

        if num_images:
            diffusion_loss = F.mse_loss(out.noise_pred.float(), noise.float())
        else:
            diffusion_loss = lm_loss.new_zeros(())
        loss = lm_loss + self.loss_weight * diffusion_loss
        return LossOutput(loss, lm_loss.detach(), diffusion_loss.detach(), num_targets, num_images)
