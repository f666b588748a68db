"""The one definition of which token may attend to which (the hybrid Transfusion mask), as a leaf module that
the model (HybridMask), every attention kernel and the FLOP counter import.

allowed(i, j) = same document AND (j <= i OR i and j belong to the same image)."""

from __future__ import annotations

import torch


def hybrid_allowed(
    q_idx: torch.Tensor,
    kv_idx: torch.Tensor,
    q_doc: torch.Tensor,
    kv_doc: torch.Tensor,
    q_img: torch.Tensor,
    kv_img: torch.Tensor,
) -> torch.Tensor:
    """The mask rule on broadcastable index/id tensors, shared by the dense builder and future kernels."""
    same_image = (q_img == kv_img) & (q_img >= 0)
    return (q_doc == kv_doc) & ((kv_idx <= q_idx) | same_image)


def cached_hybrid_allowed(
    past_doc: torch.Tensor, past_img: torch.Tensor, new_doc: torch.Tensor, new_img: torch.Tensor
) -> torch.Tensor:
    """Boolean (B, S, P+S): the rows of the S new tokens of the dense mask over the sequence [P cached, S new].
    Image ids must already be distinct between cached and new images (a new chunk holds whole images)."""
    past_len, new_len = past_doc.shape[1], new_doc.shape[1]
    device = new_doc.device
    q_idx = torch.arange(past_len, past_len + new_len, device=device)
    kv_idx = torch.arange(past_len + new_len, device=device)
    kv_doc = torch.cat((past_doc, new_doc), dim=1)
    kv_img = torch.cat((past_img, new_img), dim=1)
    return hybrid_allowed(
        q_idx[None, :, None],
        kv_idx[None, None, :],
        new_doc[:, :, None],
        kv_doc[:, None, :],
        new_img[:, :, None],
        kv_img[:, None, :],
    )
