"""FlexAttention backend for the hybrid mask: pure PyTorch (no Triton needed on CPU), built from the same ids.

* `hybrid_mask_mod` is the one mask_mod: it looks the ids up and applies `hybrid_allowed`, the rule's single
  definition in megafusion.kernels.mask_rule.
* The BlockMask comes straight from the TileMap (the id-based skip logic the Triton kernel uses) through
  `BlockMask.from_kv_blocks`, so no S x S mask is materialised (`create_block_mask` would evaluate mask_mod on every
  pair). `flex_layout` bundles both; the caller caches it per batch layout and every layer reuses it.
* Forward: compiled FlexAttention when allowed (see `_want_compile`), eager otherwise (exact, but it materialises
  the scores).
* Backward: native on CUDA. FlexAttention refuses autograd on CPU (eager and compiled alike, torch 2.13), so on
  CPU the forward runs without autograd and `_flex_cpu_backward` recomputes the probabilities one query tile at a
  time over the key tiles the TileMap visits (FlashAttention's backward in torch ops; the log-sum-exp is
  recomputed too, as the compiled CPU kernel cannot return it): memory O(tile x visited keys) instead of O(S^2).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from megafusion.kernels.mask_rule import hybrid_allowed
from megafusion.kernels.tile_map import TileMap, build_tile_map

# FlexAttention's sparse block size; its kernels tile inside these blocks on their own.
FLEX_BLOCK = 128

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Ids = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _pad_ids(t: torch.Tensor, fill: int) -> torch.Tensor:
    # Compiled kernels may evaluate mask_mod on the padding of the last block (indices up to the next multiple of
    # FLEX_BLOCK); padding the lookup tables keeps those reads in bounds (their results are discarded anyway).
    pad = -t.shape[1] % FLEX_BLOCK
    if pad == 0:
        return t
    return torch.cat((t, torch.full((t.shape[0], pad), fill, dtype=t.dtype, device=t.device)), dim=1)


def hybrid_mask_mod(q_doc: torch.Tensor, q_img: torch.Tensor, kv_doc: torch.Tensor, kv_img: torch.Tensor) -> MaskMod:
    """mask_mod(b, h, q_idx, kv_idx) of the hybrid rule; queries are the last S_q of the S_k keys."""
    offset = kv_doc.shape[1] - q_doc.shape[1]
    q_doc, q_img = _pad_ids(q_doc, -2), _pad_ids(q_img, -1)
    kv_doc, kv_img = _pad_ids(kv_doc, -3), _pad_ids(kv_img, -1)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return hybrid_allowed(q_idx + offset, kv_idx, q_doc[b, q_idx], kv_doc[b, kv_idx], q_img[b, q_idx],
                              kv_img[b, kv_idx])

    return mask_mod


def block_mask_from_tiles(tiles: TileMap, mask_mod: MaskMod) -> BlockMask:
    """BlockMask whose partial blocks are the visited, not-full tiles and whose full blocks skip mask_mod."""
    partial = tiles.visit & ~tiles.full

    def ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True)
        # (B, 1, ...): one head dimension, broadcast over heads (the mask does not depend on the head).
        return blocks.sum(-1).to(torch.int32)[:, None].contiguous(), order.to(torch.int32)[:, None].contiguous()

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(tiles.full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(tiles.block_m, tiles.block_n), mask_mod=mask_mod,
        seq_lengths=(tiles.q_len, tiles.kv_len),
    )


@dataclass(frozen=True)
class FlexLayout:
    """Everything the flex backend needs for one batch layout (build once per forward, share across layers)."""

    ids: Ids
    tiles: TileMap
    block_mask: BlockMask


def flex_layout(
    q_doc: torch.Tensor, q_img: torch.Tensor, kv_doc: torch.Tensor, kv_img: torch.Tensor, block: int = FLEX_BLOCK
) -> FlexLayout:
    ids = (q_doc, q_img, kv_doc, kv_img)
    tiles = build_tile_map(*ids, block, block)
    return FlexLayout(ids, tiles, block_mask_from_tiles(tiles, hybrid_mask_mod(*ids)))


def hybrid_block_mask(
    q_doc: torch.Tensor, q_img: torch.Tensor, kv_doc: torch.Tensor, kv_img: torch.Tensor, block: int = FLEX_BLOCK
) -> BlockMask:
    return flex_layout(q_doc, q_img, kv_doc, kv_img, block).block_mask


@functools.cache
def _compiled_flex() -> Callable[..., object]:
    return torch.compile(flex_attention)


def _want_compile(device: torch.device) -> bool:
    """MEGAFUSION_FLEX_COMPILE=0/1 forces it; by default compile on CUDA and CPU (the point of FlexAttention:
    a fused kernel that never holds the S x S scores; the first call per shape pays the compile)."""
    setting = os.environ.get("MEGAFUSION_FLEX_COMPILE", "auto").lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return device.type in ("cuda", "cpu")


def _run_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, compile: bool) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    if compile:
        return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    with warnings.catch_warnings():
        # Eager FlexAttention warns that it is unfused; here that was asked for (MEGAFUSION_FLEX_COMPILE=0).
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)


def _flex_cpu_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    d_out: torch.Tensor,
    layout: FlexLayout,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV recomputed per query tile over the key tiles that tile visits (union over the batch). Those
    tiles hold every key the tile's queries may see, so the softmax over them is the full softmax."""
    q_doc, q_img, kv_doc, kv_img = layout.ids
    tiles = layout.tiles
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    scale = head_dim**-0.5
    offset = kv_len - q_len
    dtype = q.dtype
    # fp32 math (CPU bf16 would lose the accumulation); K/V expanded per query head: O(S*D), not O(S^2).
    qf, dof = q.float(), d_out.float()
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    delta = (dof * out.float()).sum(-1)
    dq = torch.zeros_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    kv_pos = torch.arange(kv_len, device=q.device)
    visit_any = tiles.visit.any(0)  # (Mq, Nk)
    for m in range(visit_any.shape[0]):
        rows = slice(m * tiles.block_m, min((m + 1) * tiles.block_m, q_len))
        blocks = torch.nonzero(visit_any[m]).flatten()
        if blocks.numel() == 0:
            continue
        cols = (blocks[:, None] * tiles.block_n + torch.arange(tiles.block_n, device=q.device)).flatten()
        cols = cols[cols < kv_len]
        allowed = hybrid_allowed(
            (torch.arange(rows.start, rows.stop, device=q.device) + offset)[None, :, None],
            kv_pos[cols][None, None, :],
            q_doc[:, rows, None],
            kv_doc[:, None, cols],
            q_img[:, rows, None],
            kv_img[:, None, cols],
        )[:, None]  # (B, 1, rows, cols)
        k_c, v_c = kf[:, :, cols], vf[:, :, cols]
        s = (qf[:, :, rows] @ k_c.transpose(-1, -2)) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        # Every query sees at least itself, so no row is all -inf (no nan from the softmax).
        p = torch.softmax(s, dim=-1)
        do_r = dof[:, :, rows]
        dv.index_add_(2, cols, p.transpose(-1, -2) @ do_r)
        ds = p * ((do_r @ v_c.transpose(-1, -2)) - delta[:, :, rows, None])
        dq[:, :, rows] = (ds @ k_c) * scale
        dk.index_add_(2, cols, (ds.transpose(-1, -2) @ qf[:, :, rows]) * scale)
    dk = dk.view(batch, kv_heads, group, kv_len, head_dim).sum(2)
    dv = dv.view(batch, kv_heads, group, kv_len, head_dim).sum(2)
    return dq.to(dtype), dk.to(k.dtype), dv.to(v.dtype)


class _FlexWithTorchBackward(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: FlexLayout,
        compile: bool,
    ) -> torch.Tensor:
        # FlexAttention rejects CPU inputs that require grad even under no_grad: hand it detached views.
        out = _run_flex(q.detach(), k.detach(), v.detach(), layout.block_mask, compile)
        ctx.save_for_backward(q, k, v, out)
        ctx.layout = layout
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, d_out: torch.Tensor):
        q, k, v, out = ctx.saved_tensors
        dq, dk, dv = _flex_cpu_backward(q, k, v, out, d_out, ctx.layout)
        return dq, dk, dv, None, None


def flex_hybrid_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: FlexLayout, compile: bool | None = None
) -> torch.Tensor:
    """q: (B, H, S_q, D); k, v: (B, H_kv, S_k, D). compile=None follows MEGAFUSION_FLEX_COMPILE (default: on)."""
    if compile is None:
        compile = _want_compile(q.device)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.is_cuda:
        return _run_flex(q, k, v, layout.block_mask, compile)
    if needs_grad:
        return _FlexWithTorchBackward.apply(q, k, v, layout, compile)
    # No autograd wanted, but FlexAttention refuses CPU inputs flagged requires_grad even under no_grad.
    return _run_flex(q.detach(), k.detach(), v.detach(), layout.block_mask, compile)
