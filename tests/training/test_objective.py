"""Transfusion objective: targets, LM loss against transformers, and the weighted sum."""

import torch

from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.model import LlamaFusion
from megafusion.training.objective import IGNORE_INDEX, TransfusionObjective, next_token_targets
from tests.helpers import TINY_IMAGE, TINY_UNET, mixed_batch, save_tiny_llama

X = IGNORE_INDEX


def test_next_token_targets_by_hand():
    ids = torch.tensor([[10, 11, 90, 0, 0, 91, 12, 13, 14]])
    modality = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0, 0]])
    docs = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1]])
    labels = ids.clone()
    labels[0, 8] = X
    got = next_token_targets(ids, modality, docs, labels)
    # 10->11, 11->BOI(90), BOI->image (ignored), image rows ignored, EOI->12, 12->13 crosses documents, 13->masked
    assert got.tolist() == [[11, 90, X, X, 91, 12, X, X, X]]


def test_text_only_lm_loss_equals_transformers_loss(tmp_path):
    ref = save_tiny_llama(tmp_path, "gqa-untied")
    model = LlamaFusion.from_llama(tmp_path, image=TINY_IMAGE, unet=TINY_UNET)
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The objective's softmax also covers BOI/EOI: append their logits to the reference's before the CE.
        special = model(input_ids=ids).special_logits
        logits = torch.cat((ref(ids).logits, special), dim=-1)
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 99), ids[:, 1:].reshape(-1))
        out = TransfusionObjective(DDPMSchedule(), loss_weight=5.0)(model, ids)
    torch.testing.assert_close(out.lm_loss, expected, atol=1e-5, rtol=0)
    assert out.num_images == 0 and out.diffusion_loss.item() == 0.0
    assert out.num_text_targets == 2 * 29


def test_loss_is_lm_plus_weighted_diffusion(tmp_path):
    save_tiny_llama(tmp_path, "gqa-untied")
    model = LlamaFusion.from_llama(tmp_path, image=TINY_IMAGE, unet=TINY_UNET)
    batch = mixed_batch(97, TINY_IMAGE)
    with torch.no_grad():
        a = TransfusionObjective(DDPMSchedule(), 5.0)(model, batch["input_ids"], batch["modality"],
                                                       latents=batch["images"], generator=torch.Generator())
        # Recompute the diffusion term independently: same seed -> same t and noise.
        g = torch.Generator()
        t = DDPMSchedule().sample_timesteps(torch.zeros(2, dtype=torch.bool), g)
        noise = torch.randn(batch["images"].shape, generator=g)
        noisy = DDPMSchedule().add_noise(batch["images"], noise, t)
        out = model(batch["input_ids"], batch["modality"], images=noisy, timesteps=t)
    mse = torch.mean((out.noise_pred - noise) ** 2)
    torch.testing.assert_close(a.diffusion_loss, mse)
    torch.testing.assert_close(a.loss, a.lm_loss + 5.0 * mse)
    assert a.num_images == 2


def test_min_snr_weighting_scales_each_images_error(tmp_path):
    """loss_weighting=min_snr: the diffusion sum is sum_i w(t_i) * ||eps_pred_i - eps_i||^2, recomputed here with
    diffusers' SNR and the same draws; the LM term is untouched."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from megafusion.config.schema import DiffusionConfig

    save_tiny_llama(tmp_path, "gqa-untied")
    model = LlamaFusion.from_llama(tmp_path, image=TINY_IMAGE, unet=TINY_UNET)
    batch = mixed_batch(97, TINY_IMAGE)
    # gamma 0.1: below SNR for t < ~800, so almost any draw is down-weighted.
    weighted = DDPMSchedule(DiffusionConfig(loss_weighting="min_snr", min_snr_gamma=0.1))
    with torch.no_grad():
        a = TransfusionObjective(weighted, 5.0)(model, batch["input_ids"], batch["modality"],
                                                latents=batch["images"], generator=torch.Generator())
        plain = TransfusionObjective(DDPMSchedule(), 5.0)(model, batch["input_ids"], batch["modality"],
                                                           latents=batch["images"], generator=torch.Generator())
        g = torch.Generator()
        t = DDPMSchedule().sample_timesteps(torch.zeros(2, dtype=torch.bool), g)
        noise = torch.randn(batch["images"].shape, generator=g)
        out = model(batch["input_ids"], batch["modality"], images=DDPMSchedule().add_noise(batch["images"], noise, t),
                    timesteps=t)
    snr = compute_snr(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"), t)
    w = snr.clamp(max=0.1) / snr
    want = (w * ((out.noise_pred - noise) ** 2).flatten(1).sum(1)).sum()
    torch.testing.assert_close(a.diffusion_loss_sum, want.float(), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(a.diffusion_loss_sum, plain.diffusion_loss_sum), "the weights must matter here"
    torch.testing.assert_close(a.lm_loss_sum, plain.lm_loss_sum)


def test_v_prediction_loss_is_mse_against_diffusers_velocity(tmp_path):
    """prediction_type=v_prediction: the diffusion loss is the MSE between the U-Net up's output and diffusers'
    get_velocity(x_0, eps, t) for the same draws; the model carries the type so samplers read it."""
    from diffusers import DDPMScheduler

    from megafusion.config.schema import DiffusionConfig

    save_tiny_llama(tmp_path, "gqa-untied")
    model = LlamaFusion.from_llama(tmp_path, image=TINY_IMAGE, unet=TINY_UNET)
    batch = mixed_batch(97, TINY_IMAGE)
    schedule = DDPMSchedule(DiffusionConfig(prediction_type="v_prediction"))
    with torch.no_grad():
        a = TransfusionObjective(schedule, 5.0)(model, batch["input_ids"], batch["modality"],
                                                latents=batch["images"], generator=torch.Generator())
        g = torch.Generator()
        t = schedule.sample_timesteps(torch.zeros(2, dtype=torch.bool), g)
        noise = torch.randn(batch["images"].shape, generator=g)
        out = model(batch["input_ids"], batch["modality"], images=schedule.add_noise(batch["images"], noise, t),
                    timesteps=t)
    velocity = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                             prediction_type="v_prediction").get_velocity(batch["images"], noise, t)
    torch.testing.assert_close(a.diffusion_loss, torch.mean((out.noise_pred - velocity) ** 2), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a.diffusion_loss, torch.mean((out.noise_pred - noise) ** 2))
