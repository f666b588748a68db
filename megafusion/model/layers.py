"""The per-modality building blocks of a Llama layer: RMSNorm, the Q/K/V input set, SwiGLU FFN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megafusion.model.arch import LlamaArch


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the weight, exactly as the reference Llama does.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class AttentionInput(nn.Module):
    """Pre-attention norm + Q, K, V projections: the part of attention each modality owns."""

    def __init__(self, arch: LlamaArch) -> None:
        super().__init__()
        d = arch.hidden_size
        self.norm = RMSNorm(d, arch.rms_norm_eps)
        self.q_proj = nn.Linear(d, arch.num_heads * arch.head_dim, bias=False)
        self.k_proj = nn.Linear(d, arch.num_kv_heads * arch.head_dim, bias=False)
        self.v_proj = nn.Linear(d, arch.num_kv_heads * arch.head_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Returns Q, K and V concatenated on the last dim so routing handles one tensor."""
        h = self.norm(x)
        return torch.cat((self.q_proj(h), self.k_proj(h), self.v_proj(h)), dim=-1)


class FeedForward(nn.Module):
    """Pre-FFN norm + SwiGLU."""

    def __init__(self, arch: LlamaArch) -> None:
        super().__init__()
        d, f = arch.hidden_size, arch.intermediate_size
        self.norm = RMSNorm(d, arch.rms_norm_eps)
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
