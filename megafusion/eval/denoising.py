"""Held-out noise-prediction loss, and how much of it the caption explains.

Sample-based image metrics (accuracy, FID) stay at chance until a model draws recognisable images; the DDPM loss
on held-out images moves from the first steps. Each held-out latent is noised at the same timesteps with the same
noise three times and denoised after (a) its own caption, (b) a caption of another class, (c) no caption (the
image-first layout, also the CFG unconditional branch). `caption_gain` = loss(other caption) - loss(own caption):
zero when the image path ignores the text, positive once text conditioning is learned."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from megafusion.data_pipeline.tokenizer import TextTokenizer
from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.inference.sequence import pack_rows
from megafusion.model import FusionOutput, LlamaFusion


def mismatched_captions(captions: Sequence[str], labels: Sequence[Hashable]) -> list[str]:
    """For each item, the caption of the next item (cyclically) whose label differs."""
    n = len(captions)
    out = []
    for i in range(n):
        j = next((k % n for k in range(i + 1, i + n) if labels[k % n] != labels[i]), None)
        if j is None:
            raise ValueError("caption_gain needs held-out images of at least two classes")
        out.append(captions[j])
    return out


@torch.no_grad()
def predict_after_prefixes(model: LlamaFusion, prefixes: list[list[int]], noisy: torch.Tensor,
                           timesteps: torch.Tensor) -> FusionOutput:
    """One `prefix BOI image EOI` document per row (image i = noisy[i]), packed and run without LM logits."""
    rows = [[p, [model.boi_id], noisy[i], [model.eoi_id]] for i, p in enumerate(prefixes)]
    packed = pack_rows(model, rows)
    return model(packed.input_ids, packed.modality, doc_ids=packed.doc_ids, images=packed.images,
                 timesteps=timesteps, compute_logits=False)


@torch.no_grad()
def _noise_mse(model: LlamaFusion, prefixes: list[list[int]], noisy: torch.Tensor, timesteps: torch.Tensor,
               noise: torch.Tensor, batch: int, schedule: DDPMSchedule) -> float:
    total = 0.0
    for s in range(0, len(prefixes), batch):
        out = predict_after_prefixes(model, prefixes[s : s + batch], noisy[s : s + batch], timesteps[s : s + batch])
        # The implied noise, so a v-prediction model's loss reads like an epsilon one's.
        eps = schedule.epsilon(out.noise_pred.float(), noisy[s : s + batch].float(), timesteps[s : s + batch])
        err = (eps - noise[s : s + batch].float()).pow(2)
        total += float(err.mean(dim=(1, 2, 3)).sum())
    return total / len(prefixes)


def default_timesteps(num_timesteps: int) -> tuple[int, ...]:
    """10%, 30%, ..., 90% of the way through the noise process (100, 300, ..., 900 for T = 1000)."""
    return tuple(round(f * num_timesteps) for f in (0.1, 0.3, 0.5, 0.7, 0.9))


def heldout_denoising(model: LlamaFusion, tokenizer: TextTokenizer, latents: torch.Tensor, captions: Sequence[str],
                      labels: Sequence[Hashable], schedule: DDPMSchedule, timesteps: Sequence[int] | None = None,
                      seed: int = 0, batch: int = 50) -> dict:
    """Mean noise-prediction MSE over `latents` x `timesteps` (default: spread over the schedule's T) with own /
    other / no caption. `schedule` must be the model's training schedule (`DDPMSchedule(model.diffusion_args)`)."""
    if timesteps is None:
        timesteps = default_timesteps(schedule.num_timesteps)
    bad = [int(t) for t in timesteps if not 0 <= int(t) < schedule.num_timesteps]
    if bad:
        raise ValueError(f"timesteps {bad} are outside the schedule's [0, {schedule.num_timesteps})")
    dtype = model.embed_tokens.weight.dtype
    generator = torch.Generator().manual_seed(seed)
    prefix = list(tokenizer.prefix_ids)
    own = [prefix + tokenizer.encode(c) for c in captions]
    other = [prefix + tokenizer.encode(c) for c in mismatched_captions(captions, labels)]
    none = [list(prefix) for _ in captions]
    per_t = {}
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=generator)
        ts = torch.full((len(latents),), int(t), dtype=torch.long)
        noisy = schedule.add_noise(latents.float(), noise, ts).to(dtype)
        per_t[int(t)] = {name: _noise_mse(model, rows, noisy, ts, noise, batch, schedule)
                         for name, rows in (("own", own), ("other", other), ("none", none))}
    mean = {k: sum(v[k] for v in per_t.values()) / len(per_t) for k in ("own", "other", "none")}
    return {
        "loss_own_caption": mean["own"],
        "loss_other_caption": mean["other"],
        "loss_no_caption": mean["none"],
        "caption_gain": mean["other"] - mean["own"],
        "timesteps": [int(t) for t in timesteps],
        "per_timestep": per_t,
        "num_images": len(latents),
    }
