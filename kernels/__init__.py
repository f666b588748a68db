"""Custom kernels (imported as `megafusion.kernels`): hybrid-mask FlashAttention and the modality-routed grouped
GEMM in Triton, the FlexAttention backend, the shared tile-skip logic and the pure-torch references.

Triton is optional. Importing this package never imports triton; the Triton entry points below import their
module on first call and raise a clear error when triton is missing or the tensors are not on CUDA (CPU tensors
work only under TRITON_INTERPRET=1, for tests)."""

from __future__ import annotations

import torch

from megafusion.kernels._triton import interpreting, require_triton, triton_available
from megafusion.kernels.reference import dense_hybrid_mask, reference_attention, reference_grouped_linear
from megafusion.kernels.tile_map import TileMap, build_tile_map

__all__ = [
    "TileMap",
    "build_tile_map",
    "dense_hybrid_mask",
    "grouped_linear",
    "hybrid_flash_attention",
    "interpreting",
    "reference_attention",
    "reference_grouped_linear",
    "triton_available",
]


def hybrid_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_doc: torch.Tensor,
    q_img: torch.Tensor,
    kv_doc: torch.Tensor,
    kv_img: torch.Tensor,
    tiles: TileMap | None = None,
    **launch: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton hybrid-mask FlashAttention: (output, natural log-sum-exp). See kernels/flash_attention.py."""
    require_triton("hybrid_flash_attention")
    from megafusion.kernels.flash_attention import hybrid_flash_attention as impl

    return impl(q, k, v, q_doc, q_img, kv_doc, kv_img, tiles=tiles, **launch)


def grouped_linear(x: torch.Tensor, split: int, w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Triton grouped GEMM: [F.linear(x[:split], w0) ; F.linear(x[split:], w1)] in one launch."""
    require_triton("grouped_linear")
    from megafusion.kernels.grouped_gemm import grouped_linear as impl

    return impl(x, split, w0, w1)
