"""One pipeline stage of a LlamaFusion: a contiguous run of its blocks, plus the embedding and the U-Net down on the
first stage and the final norm, LM head and U-Net up (and the loss sums) on the last.

The stage takes the model's own submodules, under the model's own attribute names and global layer indices
(`layers` is a ModuleDict keyed "5", "6", ...), so its parameter names are the full model's: checkpoints written
by any pipeline layout load in any other, and in one process. With tied embeddings the first and last stages each
hold the (frozen) table; nothing synchronises them, so a trainable tied table is refused (plan check).

What crosses a stage boundary is two float tensors of fixed shape (torch.distributed.pipelining infers them once):
  * h: (rows x max_len, hidden), the hidden states in the router's grouped order [text | image];
  * skip: (max_images, C, H, W), the U-Net down's skip features (Transfusion eq. 14), real images first, the rest
    zero padding; intermediate stages pass it on untouched.
The token layout (modality, document ids), timesteps, noise and LM targets are integer or side data: they reach
every stage as schedule keyword arguments (never as activations), and each stage rebuilds its router, hybrid mask
and RoPE from them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megafusion.model.attention import ATTENTION_BACKENDS
from megafusion.model.fusion import NUM_SPECIAL_TOKENS, LlamaFusion
from megafusion.model.hybrid_mask import HybridMask
from megafusion.model.layout import TokenLayout
from megafusion.model.rope import RotaryEmbedding
from megafusion.model.routing import ModalityRouter

IGNORE_INDEX = -100


class FusionStage(nn.Module):
    def __init__(self, model: LlamaFusion, layers: list[int] | tuple[int, ...], *, first: bool, last: bool,
                 max_images: int) -> None:
        """Takes (does not copy) `model`'s submodules: build each stage from a model on the meta device.
        max_images: the fixed skip rows per micro-batch (pipeline_split.max_images_per_row x rows)."""
        super().__init__()
        self.arch, self.image_config = model.arch, model.image_config
        self.attention_backend, self.routing_backend = model.attention_backend, model.routing_backend
        self.first, self.last, self.max_images = first, last, max_images
        self.vocab_size = model.arch.vocab_size
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.rotary = RotaryEmbedding(model.arch)
        tied = model.lm_head is None
        if first or (last and tied):
            self.embed_tokens = model.embed_tokens
        if first:
            self.special_embed = model.special_embed
            self.unet_down = model.unet_down
        if last:
            self.norm = model.norm
            if not tied:
                self.lm_head = model.lm_head
            self.special_head = model.special_head
            self.unet_up = model.unet_up
        self.tied = tied

    # ------------------------------------------------------------------ pieces of LlamaFusion.forward
    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        special = ids >= self.vocab_size
        h = self.embed_tokens(ids.clamp(max=self.vocab_size - 1))
        if bool(special.any()):
            extra = self.special_embed[(ids - self.vocab_size).clamp(min=0, max=NUM_SPECIAL_TOKENS - 1)]
            h = torch.where(special[..., None], extra.to(h.dtype), h)
        return h

    def _lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = (self.lm_head(hidden) if not self.tied
                  else F.linear(hidden, self.embed_tokens.weight))
        return torch.cat((logits, F.linear(hidden, self.special_head)), dim=-1)

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, modality: torch.Tensor, doc_ids: torch.Tensor,
                timesteps: torch.Tensor, image_weights: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """First stage: x = input_ids (B, S), y = noisy latents (max_images, C, H, W). Later stages: x = h,
        y = skip. Keyword tensors are this micro-batch's: modality / doc_ids / targets (B, S), timesteps
        (max_images,), image_weights (max_images,) (DDPMSchedule.loss_weights; ones when uniform), noise
        (max_images, C, H, W). Returns (h, skip), or on the last stage a (1, 2) tensor of
        [CE sum over the text targets, squared-error sum over the real images' latent elements]."""
        layout = TokenLayout.build(modality, modality, None, doc_ids, None, self.image_config.tokens_per_image)
        router = ModalityRouter(layout.modality, self.routing_backend)
        num_images = layout.num_images if router.num_image else 0
        if num_images > self.max_images:
            raise ValueError(f"a micro-batch holds {num_images} images, more than the {self.max_images} its "
                             "pipeline shapes were fixed for")
        if self.first:
            h, skip = self._first(x, y.to(self.embed_tokens.weight.dtype), timesteps, router, num_images)
        else:
            h, skip = x, y
        rope = self.rotary(layout.position_ids, h.dtype)
        mask, attention = HybridMask(layout), ATTENTION_BACKENDS[self.attention_backend]
        h_in = h
        for block in self.layers.values():
            h = block(h, router, rope, mask, attention)
        if not self.last:
            # The skip is a new tensor (not the received one) so the stage's backward sends its gradient on.
            skip = skip.clone() if not self.first else skip
            return _requiring_grad(h), _requiring_grad(skip)
        sums = self._loss_sums(h, skip, router, timesteps, image_weights, targets, noise, num_images)
        # Every received activation gets a gradient (zeros where unused: the skip rows of padding, a micro-batch
        # without images), so each micro-batch sends the same tensors back as the inferred metadata says.
        if not self.first:
            # (x * 0.0).sum(), not 0.0 * x.sum(): the latter's gradient is an expanded (stride-0) tensor, which the
            # send of an otherwise unused input (the skip of a U-Net without one) refuses as non-contiguous.
            sums = sums + (h_in * 0.0).sum() + (skip * 0.0).sum()
        return sums

    def _first(self, input_ids: torch.Tensor, images: torch.Tensor, timesteps: torch.Tensor,
               router: ModalityRouter, num_images: int) -> tuple[torch.Tensor, torch.Tensor]:
        h = self._embed(router.to_grouped(input_ids)[: router.num_text])
        c, size = self.unet_down.conv_in.out_channels, self.image_config.latent_size
        skip = images.new_zeros(self.max_images, c, size, size)
        if num_images:
            tokens, real_skip = self.unet_down(images[:num_images], timesteps[:num_images])
            h = torch.cat((h, tokens.reshape(-1, tokens.shape[-1])), dim=0)
            skip = torch.cat((real_skip, skip[num_images:]), dim=0)
        return h, skip

    def _loss_sums(self, h: torch.Tensor, skip: torch.Tensor, router: ModalityRouter, timesteps: torch.Tensor,
                   image_weights: torch.Tensor, targets: torch.Tensor, noise: torch.Tensor, num_images: int
                   ) -> torch.Tensor:
        text_h, image_h = router.split(h)
        text_h = self.norm(text_h)
        text_index = router.text_index
        if text_index is None:
            text_index = torch.arange(router.num_text, device=h.device)
        flat = targets.reshape(-1)[text_index]
        valid = flat != IGNORE_INDEX
        logits = self._lm_logits(text_h[valid]).float()
        if int(valid.sum()):
            lm_sum = F.cross_entropy(logits, flat[valid], reduction="sum")
        else:
            lm_sum = logits.sum() * 0.0
        if num_images:
            pred = self.unet_up(image_h.reshape(num_images, -1, h.shape[-1]), timesteps[:num_images],
                                skip[:num_images])
            # The objective's weighted_squared_error (training/objective.py), which this layer may not import.
            per_image = F.mse_loss(pred.float(), noise[:num_images].float(), reduction="none").flatten(1).sum(1)
            diffusion_sum = (per_image * image_weights[:num_images].float()).sum()
        else:
            diffusion_sum = lm_sum.new_zeros(())
        return torch.stack((lm_sum, diffusion_sum)).reshape(1, 2)


def _requiring_grad(t: torch.Tensor) -> torch.Tensor:
    """Stage outputs must require grad in every micro-batch alike: the schedule infers once which outputs get a
    gradient back. Frozen-text-only rows (or an all-padding skip) would otherwise have none."""
    if torch.is_grad_enabled() and not t.requires_grad:
        t = t.detach().requires_grad_()
    return t


__all__ = ["FusionStage"]
