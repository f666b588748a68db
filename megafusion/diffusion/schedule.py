"""The DDPM forward process: the cosine schedule (Nichol & Dhariwal 2021, the paper's) or the linear one of Ho et
al., T = 1000 by default.

Written out (a few lines) rather than borrowing diffusers' scheduler so the training path owns its numbers;
the tests check them against diffusers' DDPMScheduler with the same beta_schedule name."""

from __future__ import annotations

import math

import torch

from megafusion.model.args import DiffusionArgs


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020's schedule, as diffusers' `linear` (defaults of DDPMScheduler)."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


BETA_FUNCTIONS = {"squaredcos_cap_v2": cosine_betas, "linear": linear_betas}
LOSS_WEIGHTINGS = ("uniform", "min_snr")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


class DDPMSchedule:
    def __init__(self, config: DiffusionArgs | None = None, image_first_max_timestep: int | None = None) -> None:
        """config: anything with num_train_timesteps and beta_schedule (DiffusionArgs, or the run config's
        DiffusionConfig, whose image_first_max_timestep is used unless given here)."""
        config = config or DiffusionArgs()
        self.num_timesteps = config.num_train_timesteps
        self.beta_schedule = config.beta_schedule
        if self.beta_schedule not in BETA_FUNCTIONS:
            raise ValueError(f"beta_schedule: must be one of {sorted(BETA_FUNCTIONS)}, got {self.beta_schedule!r}")
        if image_first_max_timestep is None:
            image_first_max_timestep = getattr(config, "image_first_max_timestep", self.num_timesteps - 1)
        self.image_first_max_timestep = image_first_max_timestep
        self.betas = BETA_FUNCTIONS[self.beta_schedule](self.num_timesteps)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        # Training-only settings of the run config's DiffusionConfig; a saved model's DiffusionArgs has none.
        self.loss_weighting = getattr(config, "loss_weighting", "uniform")
        self.min_snr_gamma = getattr(config, "min_snr_gamma", 5.0)
        self.prediction_type = getattr(config, "prediction_type", "epsilon")
        self.timestep_sampling = getattr(config, "timestep_sampling", "uniform")
        self.logit_mean = getattr(config, "logit_mean", 0.0)
        self.logit_std = getattr(config, "logit_std", 1.0)
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting: must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling: must be one of {TIMESTEP_SAMPLINGS}, got {self.timestep_sampling!r}")

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t) of each timestep, in float64."""
        abar = self.alphas_cumprod.double().to(timesteps.device)[timesteps.long()]
        return abar / (1.0 - abar)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-image weight of the squared error against `target` (None = uniform: every image weighs 1). min_snr:
        min(SNR, gamma) / SNR for epsilon prediction, min(SNR, gamma) / (SNR + 1) for v prediction (Hang et al.'s
        two forms: the same weight on the implied x0 error)."""
        if self.loss_weighting == "uniform":
            return None
        snr = self.snr(timesteps)
        denominator = snr + 1.0 if self.prediction_type == "v_prediction" else snr
        return (snr.clamp(max=self.min_snr_gamma) / denominator).float()

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod.to(like.device)[timesteps.long()]
        shape = (-1,) + (1,) * (like.dim() - 1)
        return abar.sqrt().to(like.dtype).reshape(shape), (1.0 - abar).sqrt().to(like.dtype).reshape(shape)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the U-Net up is trained to output: the noise (epsilon), or the velocity
        v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022; diffusers' `get_velocity`)."""
        if self.prediction_type == "epsilon":
            return noise
        a, s = self._coefficients(timesteps, latents)
        return a * noise - s * latents

    def epsilon(self, prediction: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The noise a prediction implies (eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t for v prediction), so noise
        errors compare across prediction types."""
        if self.prediction_type == "epsilon":
            return prediction
        a, s = self._coefficients(timesteps, prediction)
        return a * prediction + s * noisy.to(prediction.dtype)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eq. 2), one timestep per image."""
        a, s = self._coefficients(timesteps, latents)
        return a * latents + s * noise

    def sample_timesteps(
        self, image_first: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Uniform t in [0, T) (or logit-normal, see DiffusionConfig.timestep_sampling); images that precede their
        caption get a uniform t <= image_first_max_timestep, so the caption's LM loss still sees a readable image
        (Transfusion)."""
        n = image_first.numel()
        device = image_first.device
        first = image_first.reshape(-1).bool()
        if self.timestep_sampling == "uniform":
            u = torch.rand(n, generator=generator, device=device)
        else:
            # One normal draw per image gives both densities: its CDF is uniform, its sigmoid logit-normal.
            z = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
            u = torch.where(first, torch.special.ndtr(z), torch.sigmoid(self.logit_mean + self.logit_std * z))
        high = torch.where(
            first,
            torch.tensor(self.image_first_max_timestep + 1, device=device),
            torch.tensor(self.num_timesteps, device=device),
        )
        return (u * high).long().clamp(max=self.num_timesteps - 1)
