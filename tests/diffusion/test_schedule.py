"""The DDPM cosine schedule against diffusers' DDPMScheduler (the independent reference)."""

import pytest
import torch
from diffusers import DDPMScheduler

from megafusion.config.schema import DiffusionConfig
from megafusion.diffusion.schedule import DDPMSchedule


def _reference():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def test_alphas_cumprod_match_diffusers():
    ours = DDPMSchedule(DiffusionConfig(num_train_timesteps=1000))
    ref = _reference()
    assert ours.alphas_cumprod.shape == ref.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.betas.float(), ref.betas, atol=1e-6, rtol=0)


def test_add_noise_matches_diffusers():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 8, 6, 6, generator=g), torch.randn(4, 8, 6, 6, generator=g)
    t = torch.tensor([0, 250, 500, 999])
    torch.testing.assert_close(DDPMSchedule().add_noise(x0, noise, t), _reference().add_noise(x0, noise, t),
                               atol=1e-5, rtol=0)


def test_image_first_timesteps_are_capped():
    schedule = DDPMSchedule(DiffusionConfig(image_first_max_timestep=300))
    first = torch.tensor([True, False] * 4000)
    t = schedule.sample_timesteps(first, torch.Generator().manual_seed(0))
    assert t[first].max() <= 300 and t[first].min() == 0
    assert t[~first].max() > 900 and t[~first].max() <= 999
    assert abs(t[~first].float().mean().item() - 499.5) < 15


def test_logit_normal_timesteps_follow_diffusers_sd3_density():
    """Caption-first images: t/T distributed as diffusers' SD3 `compute_density_for_timestep_sampling`
    (logit_normal); image-first images: still uniform under their cap."""
    from diffusers.training_utils import compute_density_for_timestep_sampling
    from scipy.stats import ks_2samp, kstest

    mean, std, n = 0.8, 1.2, 20_000
    schedule = DDPMSchedule(DiffusionConfig(image_first_max_timestep=300, timestep_sampling="logit_normal",
                                            logit_mean=mean, logit_std=std))
    first = torch.tensor([True, False] * n)
    t = schedule.sample_timesteps(first, torch.Generator().manual_seed(0))
    ref = compute_density_for_timestep_sampling("logit_normal", n, logit_mean=mean, logit_std=std,
                                                generator=torch.Generator().manual_seed(1))
    ref_t = (ref * 1000).long().clamp(max=999)
    assert ks_2samp(t[~first].numpy(), ref_t.numpy()).pvalue > 0.01
    shifted = compute_density_for_timestep_sampling("logit_normal", n, logit_mean=mean + 0.1, logit_std=std,
                                                    generator=torch.Generator().manual_seed(1))
    assert ks_2samp(t[~first].numpy(), (shifted * 1000).long().numpy()).pvalue < 1e-3  # the check can tell
    assert t[first].max() <= 300 and t[first].min() == 0
    assert kstest((t[first].double() + 0.5).numpy() / 301, "uniform").pvalue > 0.01


def test_uniform_timesteps_draw_as_before():
    """The default keeps the draw every earlier run made: floor(U[0, 1) * T)."""
    t = DDPMSchedule().sample_timesteps(torch.zeros(64, dtype=torch.bool), torch.Generator().manual_seed(3))
    expected = (torch.rand(64, generator=torch.Generator().manual_seed(3)) * 1000).long()
    assert torch.equal(t, expected)


@pytest.mark.parametrize("schedule,steps", [("linear", 1000), ("linear", 500), ("squaredcos_cap_v2", 250)])
def test_each_beta_schedule_matches_diffusers(schedule, steps):
    from megafusion.model.args import DiffusionArgs

    ours = DDPMSchedule(DiffusionArgs(num_train_timesteps=steps, beta_schedule=schedule))
    ref = DDPMScheduler(num_train_timesteps=steps, beta_schedule=schedule)
    torch.testing.assert_close(ours.betas.float(), ref.betas, atol=1e-7, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6, rtol=0)


def test_run_config_beta_schedule_is_used():
    ours = DDPMSchedule(DiffusionConfig(beta_schedule="linear"))
    torch.testing.assert_close(ours.betas.float(), DDPMScheduler(beta_schedule="linear").betas, atol=1e-7, rtol=0)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_match_diffusers_compute_snr(gamma):
    """Min-SNR-gamma (epsilon prediction) as diffusers' training examples compute it: min(SNR, gamma) / SNR."""
    from diffusers.training_utils import compute_snr

    t = torch.tensor([0, 1, 10, 100, 400, 700, 999])
    ours = DDPMSchedule(DiffusionConfig(loss_weighting="min_snr", min_snr_gamma=gamma)).loss_weights(t)
    snr = compute_snr(DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"), t)
    want = torch.stack([snr, gamma * torch.ones_like(snr)]).min(dim=0)[0] / snr
    # diffusers computes SNR in float32 (5e-4 off where SNR ~ 1e5); ours in float64.
    torch.testing.assert_close(ours, want.float(), rtol=1e-3, atol=1e-7)
    assert ours[0] < 0.01 and ours[-1] == 1.0, "low-noise steps are down-weighted, high-noise ones keep weight 1"
    assert DDPMSchedule(DiffusionConfig()).loss_weights(t) is None, "uniform: the paper's plain MSE"


def test_v_target_is_diffusers_velocity_and_min_snr_uses_snr_plus_one():
    """prediction_type=v_prediction: the target is diffusers' get_velocity, and Min-SNR takes its v form
    min(SNR, gamma) / (SNR + 1) (diffusers' train_text_to_image for v_prediction)."""
    from diffusers.training_utils import compute_snr

    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 100, 500, 900, 999])
    ours = DDPMSchedule(DiffusionConfig(prediction_type="v_prediction", loss_weighting="min_snr"))
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    torch.testing.assert_close(ours.target(latents, noise, t), ref.get_velocity(latents, noise, t),
                               atol=1e-5, rtol=1e-5)
    snr = compute_snr(ref, t)
    want = torch.stack([snr, 5.0 * torch.ones_like(snr)]).min(dim=0)[0] / (snr + 1)
    torch.testing.assert_close(ours.loss_weights(t), want.float(), rtol=1e-3, atol=1e-7)
    eps = DDPMSchedule(DiffusionConfig())
    assert eps.target(latents, noise, t) is noise, "epsilon prediction's target is the noise itself"


@pytest.mark.parametrize("t", [20, 480, 960])
def test_v_prediction_implies_the_noise_diffusers_steps_with(t):
    """schedule.epsilon(v, x_t, t) is the noise diffusers' DDIM derives from a v prediction: a DDIM step on the
    v output with a v_prediction scheduler equals a step on our implied noise with an epsilon scheduler."""
    from diffusers import DDIMScheduler

    g = torch.Generator().manual_seed(1)
    x_t, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ours = DDPMSchedule(DiffusionConfig(prediction_type="v_prediction"))
    eps = ours.epsilon(v, x_t, torch.full((3,), t))
    steps = []
    for kind, out in (("v_prediction", v), ("epsilon", eps)):
        sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=kind,
                              clip_sample=False)
        sched.set_timesteps(50)
        steps.append(sched.step(out, t, x_t).prev_sample)
    torch.testing.assert_close(steps[0], steps[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(eps, v), "the conversion must do something at every t tested"
