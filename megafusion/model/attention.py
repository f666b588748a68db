"""Attention backends over the shared (text + image) sequence. SDPA is the reference backend.

* `sdpa`   (default, the reference): torch SDPA under the dense (B, S, S) boolean HybridMask.dense() (is_causal
            for plain causal batches);
* `flex`   : FlexAttention (kernels/flex.py) with a BlockMask built from the ids, compiled (MEGAFUSION_FLEX_COMPILE=0:
            eager); on CPU, where FlexAttention has no backward, a block-sparse torch backward over the same tiles;
* `triton` : the hybrid-mask FlashAttention kernel (kernels/flash_attention.py), mask evaluated in-kernel from the
            ids; CUDA, or CPU tensors under TRITON_INTERPRET=1 (tests);
* `auto`   : `triton` for CUDA tensors when triton imports, else `sdpa`.

`auto` keeps SDPA on CPU: at the lengths CPU runs use it is exact, needs no compilation (the compiled flex kernel
costs seconds to tens of seconds per new shape, bad for decoding loops whose length changes every step) and trains
with torch's fused backward. Choose `flex` explicitly for long-context CPU work (benchmarks/attention_kernels.py).

The flex and triton backends derive everything from the per-token ids of the mask's layout. Their block-level
data (BlockMask / TileMap) is built once per HybridMask, which is built once per forward and shared by every
layer, so it is not rebuilt per layer."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from megafusion.model.hybrid_mask import CachedHybridMask, HybridMask

# Triton tile shape of the hybrid kernel on CUDA (tests call the kernel directly with smaller tiles).
TRITON_BLOCK_M = 64
TRITON_BLOCK_N = 64

# Per-mask cache of block-level structures; weak keys, so it dies with the forward pass that built the mask.
_BLOCK_CACHE: weakref.WeakKeyDictionary[HybridMask, dict[Any, Any]] = weakref.WeakKeyDictionary()


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: HybridMask) -> torch.Tensor:
    """q: (B, H, S, D); k, v: (B, H_kv, S, D) with H a multiple of H_kv (grouped-query attention)."""
    gqa = q.shape[1] != k.shape[1]
    if mask.is_causal_only:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense()[:, None], enable_gqa=gqa)


def mask_ids(mask: HybridMask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(query doc ids, query image ids, key doc ids, key image ids); with a KV cache the keys are [cached, new]
    and the queries are the last of them."""
    lay = mask.layout
    if isinstance(mask, CachedHybridMask):
        kv_doc = torch.cat((mask.past_doc_ids, lay.doc_ids), dim=1)
        kv_img = torch.cat((mask.past_image_ids, lay.image_ids), dim=1)
        return lay.doc_ids, lay.image_ids, kv_doc, kv_img
    return lay.doc_ids, lay.image_ids, lay.doc_ids, lay.image_ids


def _cached(mask: HybridMask, key: Any, build: Callable[[], Any]) -> Any:
    entry = _BLOCK_CACHE.setdefault(mask, {})
    if key not in entry:
        entry[key] = build()
    return entry[key]


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: HybridMask) -> torch.Tensor:
    from megafusion.kernels.flex import flex_hybrid_attention, flex_layout

    layout = _cached(mask, "flex", lambda: flex_layout(*mask_ids(mask)))
    return flex_hybrid_attention(q, k, v, layout)


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: HybridMask) -> torch.Tensor:
    from megafusion.kernels import build_tile_map, hybrid_flash_attention

    # int32 ids are what the kernel reads; converted once per forward, not per layer.
    ids = _cached(mask, "ids32", lambda: tuple(t.to(torch.int32).contiguous() for t in mask_ids(mask)))
    tiles = _cached(mask, ("tiles", TRITON_BLOCK_M, TRITON_BLOCK_N),
                    lambda: build_tile_map(*ids, TRITON_BLOCK_M, TRITON_BLOCK_N))
    out, _ = hybrid_flash_attention(q, k, v, *ids, tiles=tiles)
    return out


def auto_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: HybridMask) -> torch.Tensor:
    from megafusion.kernels import triton_available

    if q.is_cuda and triton_available():
        return triton_attention(q, k, v, mask)
    return sdpa_attention(q, k, v, mask)


ATTENTION_BACKENDS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, HybridMask], torch.Tensor]] = {
    "sdpa": sdpa_attention,
    "flex": flex_attention,
    "triton": triton_attention,
    "auto": auto_attention,
}
