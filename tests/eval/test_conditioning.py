"""The conditioning probe: a caption swap's effect on the image tokens' last hidden states and the noise
prediction, against hand-built single documents, and the hidden states' energy share in their top dimensions."""

import pytest
import torch

from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.eval.conditioning import TOP_DIMS, conditioning_probe
from megafusion.model import IMAGE, TEXT
from tests.helpers import TINY_IMAGE


def _document(model, tok, caption, noisy, t):
    """One unpadded document `caption BOI [image] EOI`: (image hidden states before the U-Net up, noise pred)."""
    n = model.image_config.tokens_per_image
    ids = list(tok.prefix_ids) + tok.encode(caption)
    tokens = [*ids, model.boi_id, *([0] * n), model.eoi_id]
    modality = [TEXT] * (len(ids) + 1) + [IMAGE] * n + [TEXT]
    seen = []
    hook = model.unet_up.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(torch.tensor([tokens]), torch.tensor([modality]), images=noisy[None],
                    timesteps=torch.tensor([t]), compute_logits=False)
    hook.remove()
    return seen[0][0], out.noise_pred[0]


def test_probe_matches_hand_built_documents(tiny):
    model, tok = tiny
    schedule = DDPMSchedule()
    shape = (TINY_IMAGE.latent_channels, TINY_IMAGE.latent_size, TINY_IMAGE.latent_size)
    latents = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    own, other = ["a red circle", "a cat"], ["two blue squares at the top", "a dog"]
    got = conditioning_probe(model, tok, latents, own, other, schedule, timestep=300, seed=4)

    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
    noisy = schedule.add_noise(latents, noise, torch.full((2,), 300))
    hidden_change, noise_change, hidden = [], [], []
    for i in range(2):
        h_own, e_own = _document(model, tok, own[i], noisy[i], 300)
        h_other, e_other = _document(model, tok, other[i], noisy[i], 300)
        hidden_change.append(float((h_own - h_other).norm() / h_own.norm()))
        noise_change.append(float((e_own - e_other).norm() / e_own.norm()))
        hidden.append(h_own)
    assert got["timestep"] == 300 and got["num_images"] == 2
    assert got["caption_swap_hidden_change"] == pytest.approx(sum(hidden_change) / 2, rel=1e-4)
    assert got["caption_swap_noise_change"] == pytest.approx(sum(noise_change) / 2, rel=1e-4)
    assert got["caption_swap_noise_change"] > 0, "a random image path still sees the text"
    flat = torch.cat(hidden)
    assert got["image_hidden_rms"] == pytest.approx(float(flat.pow(2).mean(-1).sqrt().mean()), rel=1e-5)
    top = got["top_dims"]
    assert len(top) == TOP_DIMS
    share = float(flat[:, top].pow(2).sum() / flat.pow(2).sum())
    assert got[f"top{TOP_DIMS}_dims_energy_share"] == pytest.approx(share, rel=1e-5)


def test_same_caption_moves_nothing(tiny):
    model, tok = tiny
    latents = torch.randn(2, TINY_IMAGE.latent_channels, TINY_IMAGE.latent_size, TINY_IMAGE.latent_size)
    got = conditioning_probe(model, tok, latents, ["a cat", "a dog"], ["a cat", "a dog"], DDPMSchedule())
    assert got["caption_swap_hidden_change"] == 0.0 and got["caption_swap_noise_change"] == 0.0
    assert got["timestep"] == 500
