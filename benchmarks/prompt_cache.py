"""Denoising with the prompt's K/V cached once against recomputing the whole prompt + image at every step.

Both loops sample the same image from the same noise with the same scheduler: the cached loop runs the prompt
(... BOI) once into a KVCache and then only the image chunk per step; the uncached loop runs the full
[prompt, BOI, image] sequence per step. The cached time includes its one prefill. Runs alternate so machine
noise hits both alike; the best of the repeats is reported. Model: SmolLM2-135M widths with fewer layers
(random weights: speed does not depend on them), image shape from the SmolLM2 config.

    python benchmarks/prompt_cache.py [--prompt-len 256 --steps 20 --layers 4 --repeats 3 --threads 1]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch

from megafusion.config import load_config
from megafusion.inference.denoise import make_scheduler, predict_noise
from megafusion.inference.sequence import prefill
from megafusion.model import LlamaArch, LlamaFusion

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smollm2-135m-deep.yaml"


def build(args: argparse.Namespace) -> LlamaFusion:
    cfg = load_config(args.config)
    arch = LlamaArch(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=args.layers, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaFusion(arch, "deep", cfg.image, cfg.unet)
    model.init_image_set_from_text()
    return model.eval()


def cached_loop(model: LlamaFusion, prompt: list[int], noise: torch.Tensor, steps: int) -> torch.Tensor:
    scheduler = make_scheduler("ddim", steps)
    cache = prefill(model, [[prompt, [model.boi_id]]]).cache  # once
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(predict_noise(model, cache, x, t), t, x).prev_sample
    return x


def uncached_loop(model: LlamaFusion, prompt: list[int], noise: torch.Tensor, steps: int) -> torch.Tensor:
    scheduler = make_scheduler("ddim", steps)
    n = model.image_config.tokens_per_image
    ids = torch.tensor([prompt + [model.boi_id] + [0] * n])
    modality = torch.zeros_like(ids)
    modality[:, -n:] = 1
    x = noise
    for t in scheduler.timesteps:
        eps = model(ids, modality, images=x, timesteps=t.reshape(1), compute_logits=False).noise_pred
        x = scheduler.step(eps, t, x).prev_sample
    return x


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=256, help="prompt tokens before BOI")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    # One thread by default: on a shared 2-core machine, OpenMP threads contending with other jobs made both
    # loops several times slower and noisier (measured here: 84 s for the whole run with 2 threads, 19 s with 1).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--config", default=str(CONFIG), help="YAML whose image/unet shapes are used")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build(args)
    img = model.image_config
    prompt = torch.randint(3, model.arch.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(1))
    prompt = prompt.tolist()
    noise = torch.randn(1, img.latent_channels, img.latent_size, img.latent_size,
                        generator=torch.Generator().manual_seed(2))
    cached_times, uncached_times = [], []
    with torch.no_grad():
        cached_loop(model, prompt, noise, 1)  # warm-up
        uncached_loop(model, prompt, noise, 1)
        for _ in range(args.repeats):
            t, a = timed(lambda: cached_loop(model, prompt, noise, args.steps))
            cached_times.append(t)
            t, b = timed(lambda: uncached_loop(model, prompt, noise, args.steps))
            uncached_times.append(t)
    cached, uncached = min(cached_times), min(uncached_times)
    print(f"model: {args.layers} deep-separation layers at SmolLM2-135M widths (hidden 576, 9/3 heads), "
          f"{img.tokens_per_image} image tokens ({img.latent_channels}x{img.latent_size}x{img.latent_size} latents), "
          f"{torch.get_num_threads()} threads")
    print(f"prompt length: {args.prompt_len} tokens (+ BOI), denoising steps: {args.steps}, "
          f"best of {args.repeats}")
    print(f"recompute prompt + image every step: {uncached:.3f} s ({1e3 * uncached / args.steps:.1f} ms/step)")
    print(f"prompt K/V cached once, reused:      {cached:.3f} s ({1e3 * cached / args.steps:.1f} ms/step, "
          "prefill included)")
    print(f"speedup: {uncached / cached:.2f}x   (max |difference| of the sampled latents: {(a - b).abs().max():.1e})")


if __name__ == "__main__":
    main()
