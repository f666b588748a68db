"""The model's own arguments: what a LlamaFusion is built from and what a saved one carries, beside the
architecture read from the base checkpoint (model/arch.py). The run config (megafusion.config) imports these;
nothing here knows about runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Separation = Literal["deep", "ffn", "none"]
SEPARATIONS: tuple[str, ...] = ("deep", "ffn", "none")
# Backends compute the same function with different kernels (model/attention.py, model/routing.py).
AttentionChoice = Literal["sdpa", "flex", "triton", "auto"]
ATTENTION_CHOICES: tuple[str, ...] = ("sdpa", "flex", "triton", "auto")
RoutingChoice = Literal["index", "triton", "auto"]
ROUTING_CHOICES: tuple[str, ...] = ("index", "triton", "auto")
BetaSchedule = Literal["squaredcos_cap_v2", "linear"]
BETA_SCHEDULES: tuple[str, ...] = ("squaredcos_cap_v2", "linear")
PredictionType = Literal["epsilon", "v_prediction"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ImageConfig:
    """Shape of the VAE latents and how they become transformer tokens (paper: 32x32x8 -> 256 tokens)."""

    latent_channels: int = 8
    latent_size: int = 32
    patch_size: int = 2

    def __post_init__(self) -> None:
        _require(self.latent_channels > 0, f"latent_channels: must be positive, got {self.latent_channels}")
        _require(self.latent_size > 0, f"latent_size: must be positive, got {self.latent_size}")
        _require(self.patch_size > 0, f"patch_size: must be positive, got {self.patch_size}")
        _require(
            self.latent_size % self.patch_size == 0,
            f"patch_size: {self.patch_size} must divide latent_size {self.latent_size}",
        )

    @property
    def grid_size(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size**2


@dataclass
class UNetConfig:
    """U-Net down/up samplers between latents and image tokens (paper: 2 blocks each)."""

    channels: int = 256
    num_blocks: int = 2
    norm_groups: int = 32
    time_embed_dim: int = 512
    # Whether the U-Net up also gets the down's full-resolution features (the usual U-Net skip; Transfusion's
    # default). Through the skip the U-Net can denoise around the transformer, which alone sees the text, so the
    # condition is learned late; without it every image passes through its image tokens and the text they read.
    skip: bool = True
    # Multiplies the token projection's initial weights and bias (1 = PyTorch's default init). PyTorch's init
    # starts the image tokens at ~3.3x the norm of SmolLM2-135M's text embeddings (median 10.5 vs 3.15), so they
    # enter the text-initialised layers out of scale; 0.3 starts them at the text norm (see the demo config).
    token_init_scale: float = 1.0

    def __post_init__(self) -> None:
        _require(self.token_init_scale > 0, f"token_init_scale: must be positive, got {self.token_init_scale}")
        _require(self.channels > 0, f"channels: must be positive, got {self.channels}")
        _require(self.num_blocks >= 1, f"num_blocks: must be at least 1, got {self.num_blocks}")
        _require(
            self.norm_groups > 0 and self.channels % self.norm_groups == 0,
            f"norm_groups: {self.norm_groups} must divide channels {self.channels}",
        )
        _require(
            self.time_embed_dim > 0 and self.time_embed_dim % 2 == 0,
            f"time_embed_dim: must be a positive even number, got {self.time_embed_dim}",
        )


@dataclass(frozen=True)
class DiffusionArgs:
    """The noise process a model was trained with; samplers and evaluation must use the same one."""

    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = "squaredcos_cap_v2"
    prediction_type: PredictionType = "epsilon"

    def __post_init__(self) -> None:
        _require(self.num_train_timesteps > 1, f"num_train_timesteps: must be > 1, got {self.num_train_timesteps}")
        _require(self.beta_schedule in BETA_SCHEDULES,
                 f"beta_schedule: must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
        _require(self.prediction_type in PREDICTION_TYPES,
                 f"prediction_type: must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
