"""Round trip: image -> VAE latent shard -> streaming loader -> VAE decode, close to the original image."""

import math

import pytest
import torch

from megafusion.data_pipeline.latent_shards import precompute_latents
from megafusion.data_pipeline.loader import LatentSequenceStream, LoaderSettings, build_loader
from megafusion.data_pipeline.sources import SkipLog, center_crop_resize, image_to_tensor, iter_source
from megafusion.data_pipeline.tokenizer import write_byte_level_tiktoken
from megafusion.data_pipeline.vae import load_vae, train_vae

pytestmark = pytest.mark.slow


def test_image_to_shard_to_loader_to_decode(tmp_path):
    torch.set_num_threads(1)  # small convolutions: one thread is faster than two fighting for the cores
    metrics = train_vae("demo:digits", tmp_path / "vae", resolution=16, steps=200, batch_size=32, progress=False)
    vae = load_vae(tmp_path / "vae")
    scale = float(vae.config.scaling_factor)
    out = tmp_path / "shards"
    precompute_latents(tmp_path / "vae", "demo:digits", out, resolution=16, shard_size=40, split="test",
                       progress=False)
    tok = write_byte_level_tiktoken(tmp_path / "tokenizer.model")
    cfg = LoaderSettings(max_len=64, shuffle_buffer=1, num_workers=0, caption_first_prob=1.0)
    stream = LatentSequenceStream(out, tok, tokens_per_image=4, boi_id=512, eoi_id=513, cfg=cfg)
    originals = {s.key: image_to_tensor(center_crop_resize(s.load_image(), 16))
                 for s in iter_source("demo:digits", SkipLog(), split="test", resolution=16)}

    mses = []
    for batch in (b for b, _ in zip(build_loader(stream, batch_size=4), range(6), strict=False)):
        with torch.no_grad():
            decoded = vae.decode(batch["latents"].float() / scale).sample.clamp(-1, 1)
        for image, key in zip(decoded, batch["keys"], strict=True):
            mses.append(torch.mean(((image - originals[key]) / 2) ** 2).item())  # on [0, 1] pixels
    assert len(mses) >= 20
    mse = sum(mses) / len(mses)
    psnr = 10 * math.log10(1.0 / mse)
    print(f"round-trip on {len(mses)} held-out digits: MSE {mse:.5f} (pixels in [0,1]), PSNR {psnr:.1f} dB; "
          f"VAE's own held-out PSNR {metrics['recon_psnr']:.1f} dB")
    assert psnr > 20.0
    # The shard path adds only fp16 storage on top of the VAE's own reconstruction error.
    assert psnr > metrics["recon_psnr"] - 1.0
