"""Diffusion pieces: the DDPM noise schedule used for training."""

from megafusion.diffusion.schedule import DDPMSchedule, cosine_betas

__all__ = ["DDPMSchedule", "cosine_betas"]
