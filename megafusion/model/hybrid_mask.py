"""The one place that decides which token may attend to which (the hybrid Transfusion mask).

allowed(i, j) = same document AND (j <= i OR i and j belong to the same image).
Attention backends consume a HybridMask; a FlexAttention or Triton backend can read `mask_mod` or the
per-token ids instead of the dense matrix."""

from __future__ import annotations

import torch

from megafusion.model.layout import TokenLayout


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


class HybridMask:
    """Built once per forward from the layout and shared by every layer."""

    def __init__(self, layout: TokenLayout) -> None:
        self.layout = layout
        doc = layout.doc_ids
        # Plain causal attention needs no mask tensor: SDPA's is_causal path is cheaper and exact.
        self.is_causal_only = not layout.has_images and bool((doc == doc[:, :1]).all())
        self._dense: torch.Tensor | None = None

    def dense(self) -> torch.Tensor:
        """Boolean (B, S, S): True where query i may attend to key j."""
        if self._dense is None:
            lay = self.layout
            seq = lay.doc_ids.shape[1]
            idx = torch.arange(seq, device=lay.doc_ids.device)
            self._dense = hybrid_allowed(
                idx[None, :, None],
                idx[None, None, :],
                lay.doc_ids[:, :, None],
                lay.doc_ids[:, None, :],
                lay.image_ids[:, :, None],
                lay.image_ids[:, None, :],
            )
        return self._dense

    def density(self) -> float:
        """Fraction of (query, key) pairs that are computed; used for honest FLOP counts."""
        return float(self.dense().float().mean())
