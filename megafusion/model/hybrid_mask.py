"""The hybrid Transfusion mask of a batch layout (the rule itself: megafusion.kernels.mask_rule).

Attention backends consume a HybridMask; a FlexAttention or Triton backend can read `mask_mod` or the
per-token ids instead of the dense matrix. With a KV cache, CachedHybridMask applies the same rule to the rows
of the new tokens only, over [cached + new] keys."""

from __future__ import annotations

import torch

from megafusion.kernels.mask_rule import cached_hybrid_allowed, hybrid_allowed
from megafusion.model.layout import TokenLayout

__all__ = ["CachedHybridMask", "HybridMask", "cached_hybrid_allowed", "hybrid_allowed"]


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


class CachedHybridMask(HybridMask):
    """The mask of a chunk of new tokens (`layout`, image ids already offset past the cache's) attending to
    cached keys (`past_doc_ids`, `past_image_ids`) and to each other."""

    def __init__(self, layout: TokenLayout, past_doc_ids: torch.Tensor, past_image_ids: torch.Tensor) -> None:
        super().__init__(layout)
        self.past_doc_ids, self.past_image_ids = past_doc_ids, past_image_ids
        # SDPA's is_causal aligns the diagonal top-left, which is wrong once queries start after cached keys.
        self.is_causal_only = self.is_causal_only and past_doc_ids.shape[1] == 0

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = cached_hybrid_allowed(
                self.past_doc_ids, self.past_image_ids, self.layout.doc_ids, self.layout.image_ids
            )
        return self._dense
