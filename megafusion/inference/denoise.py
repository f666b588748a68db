"""Reverse diffusion of one image per row on top of a cached prefix, with classifier-free guidance.

The prefix (prompt ... BOI) is run once into a KVCache; every denoising step runs only the image chunk, whose
tokens attend to the cached prefix and to each other (bidirectionally). The step never grows the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from megafusion.inference.sequence import image_chunk
from megafusion.inference.timesteps import DEFAULT_SPACING, resolve_spacing
from megafusion.model import KVCache, LlamaFusion
from megafusion.model.args import DiffusionArgs

SamplerName = Literal["ddpm", "ddim"]
SAMPLERS: tuple[str, ...] = ("ddpm", "ddim")
# Paper: CFG 1.55 for LlamaFusion.
DEFAULT_GUIDANCE = 1.55
Generators = torch.Generator | list[torch.Generator] | None


def make_scheduler(
    sampler: SamplerName = "ddim", num_steps: int = 50, diffusion: DiffusionArgs | None = None,
    spacing: str = DEFAULT_SPACING,
) -> DDPMScheduler | DDIMScheduler:
    """diffusers' scheduler with the training noise process (`diffusion`: a model's `diffusion_args`; default
    the paper's cosine schedule, T = 1000), set to `num_steps` inference steps placed by `spacing`
    (inference/timesteps.py).
    clip_sample is off: the x0 estimate is a scaled VAE latent, not a [-1, 1] image."""
    diffusion = diffusion or DiffusionArgs()
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    spacing = resolve_spacing(spacing, diffusion.prediction_type)
    if num_steps < 1 or num_steps > diffusion.num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {diffusion.num_train_timesteps}], got {num_steps}")
    cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    # diffusers' linear betas default to 1e-4 ... 0.02, the same as the training schedule's (diffusion/schedule.py).
    scheduler = cls(
        num_train_timesteps=diffusion.num_train_timesteps,
        beta_schedule=diffusion.beta_schedule,
        prediction_type=diffusion.prediction_type,
        clip_sample=False,
        timestep_spacing=spacing,
    )
    scheduler.set_timesteps(num_steps)
    return scheduler


def uses_guidance(has_uncond: bool, guidance_scale: float | None) -> bool:
    """Whether unconditional rows must run: at scale 1 guidance is the conditional prediction alone, and the
    unconditional half of every step (half the sampling FLOPs) would only be multiplied by zero."""
    return has_uncond and guidance_scale is not None and guidance_scale != 1.0


def guided_noise(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_u + s (eps_c - eps_u)."""
    return uncond + scale * (cond - uncond)


def predict_noise(
    model: LlamaFusion, cache: KVCache, latents: torch.Tensor, timestep: torch.Tensor | int
) -> torch.Tensor:
    """One cached model call: noise prediction for one noisy image per cache row."""
    ids, modality = image_chunk(model, cache.batch_size)
    t = torch.as_tensor(timestep, device=latents.device).reshape(1).expand(latents.shape[0])
    out = model(ids, modality, images=latents, timesteps=t, compute_logits=False, kv_cache=cache)
    return out.noise_pred


@torch.no_grad()
def denoise(
    model: LlamaFusion,
    cache: KVCache,
    scheduler: DDPMScheduler | DDIMScheduler,
    uncond_cache: KVCache | None = None,
    guidance_scale: float | None = DEFAULT_GUIDANCE,
    generator: Generators = None,
    latents: torch.Tensor | None = None,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Sample one image per row of `cache` (each row ends with BOI). With `uncond_cache` (1 or B rows) and a
    guidance scale, the conditional and unconditional rows run as one batch per step. Returns (B, C, H, W)
    latents in the VAE's scaled space. `generator` may be one per image, as in diffusers pipelines."""
    batch = cache.batch_size
    cfg = uses_guidance(uncond_cache is not None, guidance_scale)
    if cfg:
        if uncond_cache.batch_size == 1 and batch > 1:
            uncond_cache = uncond_cache.select([0] * batch)
        if uncond_cache.batch_size != batch:
            raise ValueError(f"uncond_cache has {uncond_cache.batch_size} rows, expected 1 or {batch}")
        cache = KVCache.cat_batch([cache, uncond_cache])
    cfg_image = model.image_config
    shape = (batch, cfg_image.latent_channels, cfg_image.latent_size, cfg_image.latent_size)
    param = model.embed_tokens.weight
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=param.device, dtype=param.dtype)
        latents = latents * scheduler.init_noise_sigma
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="denoising", disable=not progress)):
        x = torch.cat((latents, latents)) if cfg else latents
        eps = predict_noise(model, cache, scheduler.scale_model_input(x, t), t)
        if cfg:
            eps = guided_noise(*eps.chunk(2), guidance_scale)
        latents = scheduler.step(eps, t, latents, generator=generator).prev_sample
        if callback is not None:
            callback(i, latents)
    return latents
