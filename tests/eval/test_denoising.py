"""Held-out denoising loss: equals the DDPM MSE of hand-built single documents; the caption gain sees the text."""

import pytest
import torch

from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.eval.denoising import default_timesteps, heldout_denoising, mismatched_captions
from megafusion.model import IMAGE, TEXT
from megafusion.model.args import DiffusionArgs
from tests.helpers import TINY_IMAGE


def test_mismatched_captions_take_another_label():
    caps, labels = ["a0", "b0", "a1", "c0"], ["a", "b", "a", "c"]
    other = mismatched_captions(caps, labels)
    assert other == ["b0", "a1", "c0", "a0"]
    assert all(labels[caps.index(o)] != lab for o, lab in zip(other, labels, strict=True))
    with pytest.raises(ValueError, match="two classes"):
        mismatched_captions(["x", "y"], [1, 1])


def _single_document_mse(model, ids, latent, t, noise, schedule):
    """One unpadded document `ids BOI [image] EOI`, laid out by hand."""
    n = model.image_config.tokens_per_image
    tokens = [*ids, model.boi_id, *([0] * n), model.eoi_id]
    modality = [TEXT] * (len(ids) + 1) + [IMAGE] * n + [TEXT]
    ts = torch.tensor([t])
    noisy = schedule.add_noise(latent[None], noise[None], ts)
    out = model(torch.tensor([tokens]), torch.tensor([modality]), images=noisy, timesteps=ts, compute_logits=False)
    return float((out.noise_pred - noise[None]).pow(2).mean())


def test_losses_match_hand_built_documents(tiny):
    model, tok = tiny
    schedule = DDPMSchedule()
    shape = (TINY_IMAGE.latent_channels, TINY_IMAGE.latent_size, TINY_IMAGE.latent_size)
    latents = torch.randn(3, *shape, generator=torch.Generator().manual_seed(1))
    captions, labels = ["a red circle", "two blue squares at the top", "a cat"], [0, 1, 2]
    timesteps = (50, 800)
    with torch.no_grad():
        got = heldout_denoising(model, tok, latents, captions, labels, schedule, timesteps, seed=3, batch=2)
        # The same noise draws, in the same order: one (N, C, H, W) tensor per timestep.
        gen = torch.Generator().manual_seed(3)
        noises = [torch.randn(latents.shape, generator=gen) for _ in timesteps]
        prefix = list(tok.prefix_ids)
        for key, caps in (("loss_own_caption", captions),
                          ("loss_other_caption", mismatched_captions(captions, labels)),
                          ("loss_no_caption", [None] * 3)):
            want = [_single_document_mse(model, prefix + (tok.encode(c) if c else []), latents[i], t, noises[k][i],
                                         schedule)
                    for k, t in enumerate(timesteps) for i, c in enumerate(caps)]
            assert got[key] == pytest.approx(sum(want) / len(want), rel=1e-4), key
    assert got["caption_gain"] == pytest.approx(got["loss_other_caption"] - got["loss_own_caption"])
    # A random image path still reads the text through shared attention: captions change the prediction.
    assert got["loss_own_caption"] != got["loss_other_caption"]


def test_default_timesteps_follow_the_models_schedule(tiny):
    """A model trained with T = 500 is scored at timesteps inside its schedule, never at 700 or 900."""
    model, tok = tiny
    assert default_timesteps(1000) == (100, 300, 500, 700, 900)
    schedule = DDPMSchedule(DiffusionArgs(num_train_timesteps=500, beta_schedule="linear"))
    latents = torch.randn(2, TINY_IMAGE.latent_channels, TINY_IMAGE.latent_size, TINY_IMAGE.latent_size)
    with torch.no_grad():
        got = heldout_denoising(model, tok, latents, ["a cat", "a dog"], [0, 1], schedule)
    assert got["timesteps"] == [50, 150, 250, 350, 450]
    with pytest.raises(ValueError, match=r"timesteps \[700\] are outside the schedule's \[0, 500\)"):
        heldout_denoising(model, tok, latents, ["a cat", "a dog"], [0, 1], schedule, timesteps=(100, 700))
