"""The frozen image VAE: load any diffusers `AutoencoderKL` directory, identify it, or train a small one.

No pretrained VAE is reachable here, so the demo trains a small `AutoencoderKL` on the demo images and saves it
in exactly the layout a user would bring (sd-vae-ft-mse: `config.json` + `diffusion_pytorch_model.safetensors`).
Everything downstream only ever sees such a directory.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from megafusion.common.atomic import atomic_directory, remove_stale_tmp
from megafusion.common.hashing import file_sha256

from .sources import ImageLoadError, SkipLog, center_crop_resize, image_to_tensor, is_demo, iter_source

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TRAIN_INFO_NAME = "train_vae.json"
SCALE_IMAGES = 1024  # latents of this many training images estimate the std (SD used a single batch)
HOLDOUT_EVERY = 20  # non-demo sources have no test split: every 20th image is held out from training instead


# --- loading ------------------------------------------------------------------------------------------------


def _vae_dir(path: str | Path) -> Path:
    """The directory holding the VAE's config; a full Stable Diffusion pipeline dir is accepted via its `vae/`."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"VAE directory {root}: does not exist or is not a directory")
    if not (root / CONFIG_NAME).is_file() and (root / "vae" / CONFIG_NAME).is_file():
        root = root / "vae"
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"VAE directory {root}: no {CONFIG_NAME} (expected the diffusers AutoencoderKL layout)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"VAE directory {root}: unreadable {CONFIG_NAME}: {err}") from err
    cls = config.get("_class_name") if isinstance(config, dict) else None
    if cls != "AutoencoderKL":
        raise ValueError(f"VAE directory {root}: {CONFIG_NAME} describes {cls!r}, not an AutoencoderKL")
    if not (root / WEIGHTS_NAME).is_file():
        has_bin = (root / "diffusion_pytorch_model.bin").is_file()
        hint = " (only a pickle .bin is present; convert it to safetensors)" if has_bin else ""
        raise FileNotFoundError(f"VAE directory {root}: no {WEIGHTS_NAME}{hint}")
    return root


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A diffusers AutoencoderKL from a local directory (the sd-vae-ft-mse layout, or a pipeline's `vae/`), in
    `dtype`, in eval mode with gradients off (it stays frozen). The one VAE loader: latent precomputation,
    evaluation and `generate` all use it."""
    root = _vae_dir(path)
    try:
        vae = AutoencoderKL.from_pretrained(root, use_safetensors=True, torch_dtype=dtype)
    except Exception as err:  # diffusers raises many types for mismatched configs/weights
        raise ValueError(f"VAE directory {root}: cannot load as AutoencoderKL: {type(err).__name__}: {err}") from err
    vae.eval().requires_grad_(False)
    return vae


def vae_identity(path: str | Path) -> dict:
    """What a latent manifest must record to tell which VAE (and latent scale) produced its latents."""
    root = _vae_dir(path)
    config = json.loads((root / CONFIG_NAME).read_text())
    blocks = config.get("block_out_channels", [])
    return {
        "path": str(root.resolve()),
        "weights_sha256": file_sha256(root / WEIGHTS_NAME),
        "latent_channels": config.get("latent_channels"),
        "scaling_factor": config.get("scaling_factor"),
        "shift_factor": config.get("shift_factor"),
        "sample_size": config.get("sample_size"),
        "block_out_channels": blocks,
        "downsample_factor": 2 ** (len(blocks) - 1) if blocks else None,
    }


# --- training -----------------------------------------------------------------------------------------------


def _check_architecture(resolution: int, block_out_channels: Sequence[int], norm_num_groups: int) -> None:
    if not block_out_channels:
        raise ValueError("block_out_channels: need at least one block")
    factor = 2 ** (len(block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(f"resolution: {resolution} is not divisible by the downsample factor {factor}")
    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(
            f"norm_num_groups: {norm_num_groups} must divide every block width {tuple(block_out_channels)}"
        )


def build_vae(
    resolution: int, latent_channels: int, block_out_channels: Sequence[int], norm_num_groups: int
) -> AutoencoderKL:
    """A small AutoencoderKL; every block but the last halves the size, so n blocks downsample by 2**(n-1)."""
    _check_architecture(resolution, block_out_channels, norm_num_groups)
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=resolution,
    )


def _load_images(source: str, resolution: int, skips: SkipLog, max_images: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) pixel tensors in [-1, 1]; at most `max_images` training images (the first ones).

    A small demo VAE trains from memory, so reading stops at the cap instead of decoding a huge source.
    """

    def tensors(split: str, limit: int) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for sample in iter_source(source, skips, split=split, resolution=resolution):
            if len(out) == limit:
                break
            try:
                out.append(image_to_tensor(center_crop_resize(sample.load_image(), resolution)))
            except ImageLoadError as err:
                skips.record(sample.key, str(err))
        return out

    if is_demo(source):
        train, held = tensors("train", max_images), tensors("test", max_images)
    else:
        everything = tensors("train", max_images * HOLDOUT_EVERY // (HOLDOUT_EVERY - 1) + 1)
        train = [t for i, t in enumerate(everything) if i % HOLDOUT_EVERY]
        held = [t for i, t in enumerate(everything) if not i % HOLDOUT_EVERY]
    if not train or not held:
        raise ValueError(f"source {source}: need training and held-out images, got {len(train)} and {len(held)}")
    return torch.stack(train[:max_images]), torch.stack(held)


@torch.no_grad()
def encode_mean(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Mode (mean) latents of `images` in [-1, 1], in batches."""
    return torch.cat(
        [vae.encode(images[i : i + batch_size]).latent_dist.mode() for i in range(0, len(images), batch_size)]
    )


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
    """(MSE, PSNR in dB) of decode(mean latent) against `images`, both measured on [0, 1] pixels."""
    total = 0.0
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size]
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        total += ((recon - x) / 2).pow(2).sum().item()
    mse = total / images.numel()
    return mse, 10 * math.log10(1.0 / max(mse, 1e-12))


def _check_replaceable(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_NAME).is_file())):
        raise FileExistsError(f"{out}: exists and is not a VAE directory; refusing to replace it")


def _save_atomic(vae: AutoencoderKL, out: Path, info: dict) -> None:
    """Write to a sibling temp dir, then swap it in: readers never see a half-written VAE."""
    _check_replaceable(out)
    remove_stale_tmp(out)
    with atomic_directory(out) as tmp:
        vae.save_pretrained(tmp, safe_serialization=True)
        (tmp / TRAIN_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")


def train_vae(
    source: str,
    out_dir: str | Path,
    resolution: int = 32,
    latent_channels: int = 4,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    *,
    block_out_channels: Sequence[int] = (16, 32, 32),
    norm_num_groups: int = 8,
    kl_weight: float = 1e-6,
    max_images: int = 20_000,
) -> dict:
    """Train a small AutoencoderKL on `source`'s train images and save it (sd-vae-ft-mse layout) to `out_dir`.

    Loss: pixel MSE + `kl_weight` * KL (the KL only keeps the latent scale in check; with 3 blocks 32 px
    become 8x8x`latent_channels`). After training, `scaling_factor` is set to 1 / std of the mean latents of (up to
    1,024) training images, as Stable Diffusion does, so scaled latents have unit variance for the diffusion model.
    Returns reconstruction MSE/PSNR (on [0, 1] pixels) of held-out images: the demo's test split, or every
    20th image of any other source.
    """
    out = Path(out_dir)
    _check_replaceable(out)  # fail before minutes of training, not after
    _check_architecture(resolution, block_out_channels, norm_num_groups)
    start = time.monotonic()
    skips = SkipLog()
    train, held = _load_images(source, resolution, skips, max_images)
    with torch.random.fork_rng():  # seeded init and batches without disturbing the caller's RNG
        torch.manual_seed(seed)
        vae = build_vae(resolution, latent_channels, block_out_channels, norm_num_groups)
        vae.train()
        opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
        warmup = max(1, steps // 20)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(s, steps) / steps))
        )
        bar = tqdm(range(steps), desc="train-vae", unit="step", disable=not progress)
        for step in bar:
            batch = train[torch.randint(len(train), (batch_size,))]
            posterior = vae.encode(batch).latent_dist
            recon = vae.decode(posterior.sample()).sample
            mse = (recon - batch).pow(2).mean()
            loss = mse + kl_weight * posterior.kl().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 20 == 0 or step == steps - 1:
                bar.set_postfix(mse=f"{mse.item() / 4:.5f}")  # /4: report on [0, 1] pixels like the result
        bar.close()
    vae.eval()
    latents = encode_mean(vae, train[:SCALE_IMAGES])
    scaling_factor = float(1.0 / latents.flatten().std())
    vae.register_to_config(scaling_factor=scaling_factor)
    recon_mse, recon_psnr = reconstruction_error(vae, held)
    result = {
        "recon_mse": recon_mse,
        "recon_psnr": recon_psnr,
        "scaling_factor": scaling_factor,
        "latent_shape": list(latents.shape[1:]),
        "train_images": len(train),
        "heldout_images": len(held),
        "seconds": round(time.monotonic() - start, 1),
    }
    settings = {
        "source": source,
        "resolution": resolution,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "kl_weight": kl_weight,
    }
    _save_atomic(vae, out, {**settings, **result, "skipped": skips.entries})
    return result
