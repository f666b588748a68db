"""U-Net down/up samplers between VAE latents and transformer image tokens (Transfusion, eq. 6 and 14).

The residual blocks and timestep embeddings are diffusers' (ResnetBlock2D, Timesteps, TimestepEmbedding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from megafusion.model.args import ImageConfig, UNetConfig
from megafusion.model.layers import RMSNorm


class _TimeConditioning(nn.Module):
    def __init__(self, unet: UNetConfig) -> None:
        super().__init__()
        self.proj = Timesteps(unet.channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.embed = TimestepEmbedding(unet.channels, unet.time_embed_dim)

    def forward(self, timesteps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.embed(self.proj(timesteps).to(dtype))


def _res_block(in_ch: int, out_ch: int, unet: UNetConfig) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=in_ch, out_channels=out_ch, temb_channels=unet.time_embed_dim, groups=unet.norm_groups
    )


class UNetDown(nn.Module):
    """(N, C, H, W) noisy latents + timesteps -> (N, tokens, hidden) image tokens, plus the skip features."""

    def __init__(self, image: ImageConfig, unet: UNetConfig, hidden_size: int) -> None:
        super().__init__()
        self.image = image
        self.time = _TimeConditioning(unet)
        self.conv_in = nn.Conv2d(image.latent_channels, unet.channels, 3, padding=1)
        self.blocks = nn.ModuleList(_res_block(unet.channels, unet.channels, unet) for _ in range(unet.num_blocks))
        self.to_tokens = nn.Conv2d(unet.channels, hidden_size, image.patch_size, stride=image.patch_size)
        if unet.token_init_scale != 1.0:
            with torch.no_grad():
                self.to_tokens.weight.mul_(unet.token_init_scale)
                self.to_tokens.bias.mul_(unet.token_init_scale)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        expected = (self.image.latent_channels, self.image.latent_size, self.image.latent_size)
        if latents.dim() != 4 or tuple(latents.shape[1:]) != expected:
            raise ValueError(f"images must be latents of shape (N, {', '.join(map(str, expected))}), "
                             f"got {tuple(latents.shape)}")
        temb = self.time(timesteps, latents.dtype)
        h = self.conv_in(latents)
        for block in self.blocks:
            h = block(h, temb)
        tokens = self.to_tokens(h).flatten(2).transpose(1, 2)
        return tokens, h


class UNetUp(nn.Module):
    """(N, tokens, hidden) final image hidden states + timesteps + skip -> (N, C, H, W) predicted noise."""

    def __init__(self, image: ImageConfig, unet: UNetConfig, hidden_size: int, rms_norm_eps: float) -> None:
        super().__init__()
        self.image = image
        # The LM's final norm is text-only, so the image path normalises its own last hidden states.
        self.norm = RMSNorm(hidden_size, rms_norm_eps)
        self.time = _TimeConditioning(unet)
        self.from_tokens = nn.ConvTranspose2d(hidden_size, unet.channels, image.patch_size, stride=image.patch_size)
        self.skip = unet.skip
        blocks = [_res_block(2 * unet.channels if unet.skip else unet.channels, unet.channels, unet)]
        blocks += [_res_block(unet.channels, unet.channels, unet) for _ in range(unet.num_blocks - 1)]
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(unet.norm_groups, unet.channels)
        self.conv_out = nn.Conv2d(unet.channels, image.latent_channels, 3, padding=1)

    def forward(self, tokens: torch.Tensor, timesteps: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        """`skip` is unused (may be None) when the U-Net was built with skip: false."""
        n, grid = tokens.shape[0], self.image.grid_size
        h = self.from_tokens(self.norm(tokens).transpose(1, 2).reshape(n, -1, grid, grid))
        if self.skip:
            h = torch.cat((h, skip), dim=1)
        temb = self.time(timesteps, tokens.dtype)
        for block in self.blocks:
            h = block(h, temb)
        return self.conv_out(F.silu(self.norm_out(h)))
