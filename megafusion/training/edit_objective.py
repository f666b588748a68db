"""Training data format and loss for image editing (paper section 5.2), so a model can be fine-tuned for `edit`.

An edit triplet (source image, instruction, target image) becomes one sequence

    [lead ids] BOI [source] EOI <instruction ids> BOI [target] EOI

exactly the layout `megafusion.inference.edit` samples with (tests/inference checks the two agree). The source is
an input: it stays clean (t = 0). Only the target is noised, and the loss is the target's noise-prediction MSE.
TransfusionObjective noises every image of a sequence, hence this module's own `edit_diffusion_loss`.

    triplet = EditTriplet(source=z_src, instruction_ids=tok.encode("make it red"),
                          target=z_tgt)                      # latents: (C, H, W), VAE-scaled
    example = build_edit_example(triplet, model, lead_ids=tok.prefix_ids)
    batch = collate_edit_examples([example, ...])
    loss = edit_diffusion_loss(model, batch, DDPMSchedule(model.diffusion_args), generator)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.model import IMAGE, PAD_DOC, TEXT, LlamaFusion


@dataclass
class EditTriplet:
    source: torch.Tensor  # (C, H, W) clean VAE-scaled latents of the image to edit
    instruction_ids: list[int]  # the instruction's token ids, without special tokens
    target: torch.Tensor  # (C, H, W) latents of the edited image


@dataclass
class EditExample:
    input_ids: torch.Tensor  # (S,); image positions hold 0
    modality: torch.Tensor  # (S,); 1 at image tokens
    latents: torch.Tensor  # (2, C, H, W): source, target (sequence order)
    noised: torch.Tensor  # (2,) bool: False for the source, True for the target


@dataclass
class EditBatch:
    input_ids: torch.Tensor  # (B, S), right-padded
    modality: torch.Tensor
    doc_ids: torch.Tensor  # PAD_DOC on padding
    latents: torch.Tensor  # (2B, C, H, W) in row-major sequence order
    noised: torch.Tensor  # (2B,) bool


def build_edit_example(triplet: EditTriplet, model: LlamaFusion, lead_ids: Sequence[int] = ()) -> EditExample:
    """One training sequence for a triplet. `lead_ids`: what the tokenizer puts before any text (e.g. BOS)."""
    image = model.image_config
    expected = (image.latent_channels, image.latent_size, image.latent_size)
    for name in ("source", "target"):
        if tuple(getattr(triplet, name).shape) != expected:
            raise ValueError(f"EditTriplet.{name}: expected latents of shape {expected}, "
                             f"got {tuple(getattr(triplet, name).shape)}")
    n = image.tokens_per_image
    boi, eoi = model.boi_id, model.eoi_id
    lead, instruction = list(lead_ids), list(triplet.instruction_ids)
    ids = lead + [boi] + [0] * n + [eoi] + instruction + [boi] + [0] * n + [eoi]
    modality = (
        [TEXT] * (len(lead) + 1) + [IMAGE] * n + [TEXT] * (1 + len(instruction) + 1) + [IMAGE] * n + [TEXT]
    )
    return EditExample(
        torch.tensor(ids), torch.tensor(modality), torch.stack((triplet.source, triplet.target)),
        torch.tensor([False, True]),
    )


def collate_edit_examples(examples: Sequence[EditExample]) -> EditBatch:
    """Right-pad to one batch; padding is its own document, so no real token attends to it."""
    length = max(e.input_ids.numel() for e in examples)
    ids = torch.zeros(len(examples), length, dtype=torch.long)
    modality = torch.full_like(ids, TEXT)
    doc_ids = torch.full_like(ids, PAD_DOC)
    for b, e in enumerate(examples):
        s = e.input_ids.numel()
        ids[b, :s], modality[b, :s], doc_ids[b, :s] = e.input_ids, e.modality, 0
    return EditBatch(ids, modality, doc_ids, torch.cat([e.latents for e in examples]),
                     torch.cat([e.noised for e in examples]))


def edit_diffusion_loss(
    model: LlamaFusion, batch: EditBatch, schedule: DDPMSchedule, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Noise- (or v-) prediction MSE on the targets; sources enter clean at t = 0 (as at inference)."""
    noised = batch.noised.to(batch.latents.device)
    timesteps = schedule.sample_timesteps(torch.zeros_like(noised), generator)
    timesteps = torch.where(noised, timesteps, torch.zeros_like(timesteps))
    noise = torch.randn(batch.latents.shape, generator=generator, dtype=batch.latents.dtype)
    noisy = schedule.add_noise(batch.latents, noise, timesteps)
    images = torch.where(noised[:, None, None, None], noisy, batch.latents)
    out = model(batch.input_ids, batch.modality, doc_ids=batch.doc_ids, images=images, timesteps=timesteps,
                compute_logits=False)
    target = schedule.target(batch.latents, noise, timesteps)
    return F.mse_loss(out.noise_pred[noised].float(), target[noised].float())
