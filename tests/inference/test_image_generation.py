"""Text -> image: the cached denoising step against the full uncached forward, CFG, seeds, samplers."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.inference.denoise import guided_noise, make_scheduler, predict_noise
from megafusion.inference.sequence import prefill
from megafusion.inference.text_to_image import ImageSamplingConfig, sample_images
from megafusion.model.args import DiffusionArgs
from tests.inference.helpers import prompts

N = 4  # TINY_IMAGE tokens per image


def full_forward_noise(model, prefix, latents, t):
    """Reference: one uncached forward over prefix + BOI + image (what training sees)."""
    ids = torch.tensor([list(prefix) + [model.boi_id] + [0] * N])
    modality = torch.zeros_like(ids)
    modality[:, -N:] = 1
    with torch.no_grad():
        return model(ids, modality, images=latents, timesteps=torch.tensor([t])).noise_pred


def uncached_sample(model, cond, uncond, scale, config, seed, scheduler=None):
    """Reference sampler: every step recomputes the whole prompt + image sequence, one row at a time."""
    scheduler = scheduler or make_scheduler(config.sampler, config.num_steps, model.diffusion_args)
    g = torch.Generator().manual_seed(seed)
    img = model.image_config
    x = torch.randn(len(cond), img.latent_channels, img.latent_size, img.latent_size, generator=g)
    for t in scheduler.timesteps:
        eps = torch.cat([full_forward_noise(model, p, x[i : i + 1], int(t)) for i, p in enumerate(cond)])
        if uncond is not None:
            eps_u = torch.cat([full_forward_noise(model, uncond, x[i : i + 1], int(t)) for i in range(len(cond))])
            eps = guided_noise(eps, eps_u, scale)
        x = scheduler.step(eps, t, x, generator=g).prev_sample
    return x


def test_cached_denoising_step_equals_full_forward(model):
    rows = prompts((6, 2, 9))
    with torch.no_grad():
        cache = prefill(model, [[r, [model.boi_id]] for r in rows]).cache
        x = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        for t in (999, 420, 0):
            got = predict_noise(model, cache, x, t)
            for i, r in enumerate(rows):
                torch.testing.assert_close(got[i : i + 1], full_forward_noise(model, r, x[i : i + 1], t),
                                           atol=1e-5, rtol=0)
    assert len(cache) == 10, "denoising steps must not grow the prompt cache"


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_cached_sampling_equals_uncached_sampling(model, sampler):
    rows, uncond = prompts((6, 3)), [1]
    config = ImageSamplingConfig(sampler=sampler, num_steps=6, guidance_scale=3.0)
    got = sample_images(model, [[r] for r in rows], [[uncond]], config, torch.Generator().manual_seed(5))
    ref = uncached_sample(model, rows, uncond, 3.0, config, seed=5)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_guidance_scale_one_equals_plain_conditional_sampling(model):
    rows = [[r] for r in prompts((6, 3))]
    plain = sample_images(model, rows, None, ImageSamplingConfig(sampler="ddpm", num_steps=5),
                          torch.Generator().manual_seed(1))
    one = sample_images(model, rows, [[[1]]], ImageSamplingConfig(sampler="ddpm", num_steps=5, guidance_scale=1.0),
                        torch.Generator().manual_seed(1))
    guided = sample_images(model, rows, [[[1]]], ImageSamplingConfig(sampler="ddpm", num_steps=5),
                           torch.Generator().manual_seed(1))
    # Bitwise: at scale 1 the unconditional rows are not run at all (they would only be multiplied by zero).
    assert torch.equal(one, plain)
    assert (guided - plain).abs().max() > 1e-3, "the guard: guidance 1.55 must change the image"


def test_fixed_seed_reproduces_the_image(model):
    rows = [[r] for r in prompts((5,))]
    config = ImageSamplingConfig(sampler="ddpm", num_steps=4)
    a = sample_images(model, rows, [[[1]]], config, torch.Generator().manual_seed(7))
    b = sample_images(model, rows, [[[1]]], config, torch.Generator().manual_seed(7))
    c = sample_images(model, rows, [[[1]]], config, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_one_generator_per_image_makes_images_independent_of_the_batch(model):
    rows = [[r] for r in prompts((5, 8))]
    config = ImageSamplingConfig(sampler="ddpm", num_steps=3)
    batch = sample_images(model, rows, [[[1]]], config, [torch.Generator().manual_seed(s) for s in (1, 2)])
    alone = sample_images(model, rows[1:], [[[1]]], config, [torch.Generator().manual_seed(2)])
    torch.testing.assert_close(batch[1:], alone, atol=1e-5, rtol=1e-5)


def test_schedulers_use_the_training_schedule_and_step_count(model):
    calls = []
    for sampler in ("ddpm", "ddim"):
        scheduler = make_scheduler(sampler, num_steps=7, diffusion=DiffusionArgs(num_train_timesteps=1000))
        assert scheduler.config.beta_schedule == "squaredcos_cap_v2" and len(scheduler.timesteps) == 7
    from megafusion.inference.denoise import denoise

    with torch.no_grad():
        cache = prefill(model, [[[1, 5, model.boi_id]]]).cache
    denoise(model, cache, make_scheduler("ddim", 7), callback=lambda i, x: calls.append(i))
    assert calls == list(range(7))
    with pytest.raises(ValueError, match="sampler must be one of"):
        make_scheduler("euler")


@pytest.mark.parametrize("sampler, reference", [("ddpm", DDPMScheduler), ("ddim", DDIMScheduler)])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_timestep_spacing_places_the_steps_as_diffusers_does(sampler, reference, spacing):
    ours = make_scheduler(sampler, 10, spacing=spacing)
    theirs = reference(beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing)
    theirs.set_timesteps(10)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist()


def test_default_spacing_starts_v_models_at_the_last_training_timestep():
    """Sampling starts from pure noise, which training only shows at t = T - 1; diffusers' DDIM default
    ("leading") starts 10 steps at t = 900. An epsilon model keeps leading: its clean estimate at t = 999 would
    divide by sqrt(alpha_bar) ~ 5e-5."""
    v_model = DiffusionArgs(prediction_type="v_prediction")
    assert int(make_scheduler("ddim", 10, v_model).timesteps[0]) == 999
    assert int(make_scheduler("ddim", 10, DiffusionArgs(prediction_type="epsilon")).timesteps[0]) == 900
    assert int(make_scheduler("ddim", 10, v_model, spacing="leading").timesteps[0]) == 900
    with pytest.raises(ValueError, match="timestep spacing must be one of"):
        make_scheduler("ddim", 10, spacing="middle")


def test_images_per_prompt_share_one_prefill(model):
    rows = [[r] for r in prompts((5, 8))]
    out = sample_images(model, rows, [[[1]]], ImageSamplingConfig(num_steps=2), torch.Generator().manual_seed(0),
                        images_per_prefix=3)
    assert out.shape == (6, 4, 4, 4)


LINEAR_500 = DiffusionArgs(num_train_timesteps=500, beta_schedule="linear")


@pytest.mark.parametrize("sampler, reference", [("ddpm", DDPMScheduler), ("ddim", DDIMScheduler)])
def test_scheduler_follows_the_models_diffusion_settings(sampler, reference):
    """A model trained with T = 500 and linear betas is sampled with exactly diffusers' scheduler for those
    settings, whose noise levels are the training schedule's."""
    ours = make_scheduler(sampler, 20, LINEAR_500)
    theirs = reference(num_train_timesteps=500, beta_schedule="linear", prediction_type="epsilon", clip_sample=False)
    theirs.set_timesteps(20)
    assert type(ours) is reference
    assert (ours.config.num_train_timesteps, ours.config.beta_schedule) == (500, "linear")
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, atol=0, rtol=0)
    assert ours.timesteps.tolist() == theirs.timesteps.tolist() and int(ours.timesteps.max()) < 500
    training = DDPMSchedule(LINEAR_500).alphas_cumprod
    torch.testing.assert_close(ours.alphas_cumprod.double(), training, atol=1e-6, rtol=0)
    cosine = DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2")
    assert (ours.alphas_cumprod - cosine.alphas_cumprod).abs().max() > 0.1, "the guard: the schedules differ"


@pytest.mark.parametrize("sampler, reference", [("ddpm", DDPMScheduler), ("ddim", DDIMScheduler)])
def test_sampling_uses_the_diffusion_settings_the_model_carries(model, sampler, reference):
    rows, uncond = prompts((6, 3)), [1]
    model.diffusion_args = LINEAR_500
    config = ImageSamplingConfig(sampler=sampler, num_steps=4, guidance_scale=2.0)
    got = sample_images(model, [[r] for r in rows], [[uncond]], config, torch.Generator().manual_seed(5))
    diffusers_scheduler = reference(num_train_timesteps=500, beta_schedule="linear", clip_sample=False)
    diffusers_scheduler.set_timesteps(4)
    ref = uncached_sample(model, rows, uncond, 2.0, config, seed=5, scheduler=diffusers_scheduler)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    model.diffusion_args = DiffusionArgs()
    default = sample_images(model, [[r] for r in rows], [[uncond]], config, torch.Generator().manual_seed(5))
    assert (default - got).abs().max() > 1e-3, "the guard: another schedule gives other images"
