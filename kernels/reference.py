"""Pure-torch references the kernels are tested against (and the fallbacks' semantics): SDPA under the dense
hybrid mask, and per-modality F.linear over the grouped [text | image] rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megafusion.kernels.mask_rule import hybrid_allowed


def dense_hybrid_mask(
    q_doc: torch.Tensor, q_img: torch.Tensor, kv_doc: torch.Tensor, kv_img: torch.Tensor
) -> torch.Tensor:
    """Boolean (B, S_q, S_k); the queries are the last S_q of the S_k key positions (a KV cache precedes them)."""
    q_len, kv_len = q_doc.shape[1], kv_doc.shape[1]
    q_idx = torch.arange(kv_len - q_len, kv_len, device=q_doc.device)
    kv_idx = torch.arange(kv_len, device=q_doc.device)
    return hybrid_allowed(
        q_idx[None, :, None],
        kv_idx[None, None, :],
        q_doc[:, :, None],
        kv_doc[:, None, :],
        q_img[:, :, None],
        kv_img[:, None, :],
    )


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_doc: torch.Tensor,
    q_img: torch.Tensor,
    kv_doc: torch.Tensor,
    kv_img: torch.Tensor,
) -> torch.Tensor:
    """q: (B, H, S_q, D); k, v: (B, H_kv, S_k, D)."""
    mask = dense_hybrid_mask(q_doc, q_img, kv_doc, kv_img)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=q.shape[1] != k.shape[1])


def reference_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    q_doc: torch.Tensor,
    q_img: torch.Tensor,
    kv_doc: torch.Tensor,
    kv_img: torch.Tensor,
) -> torch.Tensor:
    """Natural log-sum-exp of the masked, scaled scores, (B, H, S_q)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = dense_hybrid_mask(q_doc, q_img, kv_doc, kv_img)[:, None]
    return torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)


def reference_grouped_linear(
    x: torch.Tensor, num_text: int, w_text: torch.Tensor, w_image: torch.Tensor
) -> torch.Tensor:
    """x: (rows, in) with the first num_text rows text; weights (out, in) as nn.Linear stores them."""
    return torch.cat((F.linear(x[:num_text], w_text), F.linear(x[num_text:], w_image)), dim=0)
