"""Attention backends over the shared (text + image) sequence. SDPA is the reference backend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megafusion.model.hybrid_mask import HybridMask


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: HybridMask) -> torch.Tensor:
    """q: (B, H, S, D); k, v: (B, H_kv, S, D) with H a multiple of H_kv (grouped-query attention)."""
    gqa = q.shape[1] != k.shape[1]
    if mask.is_causal_only:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense()[:, None], enable_gqa=gqa)


ATTENTION_BACKENDS = {"sdpa": sdpa_attention}
