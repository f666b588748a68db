"""Hybrid-mask FlashAttention (forward and backward) in Triton.

FlashAttention-2 structure: one program per (query tile, batch x head) streams over key tiles with an online
softmax in fp32 and writes the output and the log-sum-exp; the backward recomputes the probabilities from the
log-sum-exp, once per key tile for dK/dV (one program per (key tile, batch x KV head), looping over the query
heads of its GQA group, so no atomics) and once per query tile for dQ.

No S x S mask exists anywhere. The mask is evaluated inside the kernel from int32 per-token ids (document id,
image id; the sequence index is the loop coordinate), and whole tiles are skipped or taken unmasked according to
the TileMap (`tile_map.py`): each program walks only its list of non-empty tiles.

This module imports triton at import time; `megafusion.kernels` imports it only when a kernel is called.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from megafusion.kernels._triton import check_devices, interpreter_dtype
from megafusion.kernels.tile_map import TileMap, build_tile_map

LOG2E = 1.4426950408889634


@triton.jit
def _hybrid_tile_mask(offs_m, offs_n, q_doc, q_img, k_doc, k_img, q_len, kv_len, q_offset):
    """The rule of megafusion.kernels.mask_rule.hybrid_allowed on one tile, plus the sequence bounds."""
    same_doc = q_doc[:, None] == k_doc[None, :]
    causal = offs_n[None, :] <= (offs_m + q_offset)[:, None]
    same_img = (q_img[:, None] == k_img[None, :]) & (q_img[:, None] >= 0)
    inside = (offs_m[:, None] < q_len) & (offs_n[None, :] < kv_len)
    return same_doc & (causal | same_img) & inside


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,  # noqa: E741 - the paper's names for the operands
    Q_DOC, Q_IMG, K_DOC, K_IMG,
    KV_COUNT, KV_INDEX, KV_FULL,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    num_heads, group, q_len, kv_len, q_offset, q_tiles, kv_tiles, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64 batch/head indices: b * stride can pass 2**31 elements on long, wide batches.
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < q_len
    d_in = offs_d < HEAD_DIM

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_in[:, None] & d_in[None, :], other=0.0)
    q_doc = tl.load(Q_DOC + b * q_len + offs_m, mask=m_in, other=0)
    q_img = tl.load(Q_IMG + b * q_len + offs_m, mask=m_in, other=-1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    tile_row = b * q_tiles + pid_m
    count = tl.load(KV_COUNT + tile_row)
    for j in range(0, count):
        n = tl.load(KV_INDEX + tile_row * kv_tiles + j)
        is_full = tl.load(KV_FULL + tile_row * kv_tiles + j)
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_in = offs_n < kv_len
        kv_mask = n_in[:, None] & d_in[None, :]
        k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        # Scores in log2 units: exp2 is the cheap instruction, and lse is converted back at the end.
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        if is_full == 0:
            k_doc = tl.load(K_DOC + b * kv_len + offs_n, mask=n_in, other=0)
            k_img = tl.load(K_IMG + b * kv_len + offs_n, mask=n_in, other=-1)
            allowed = _hybrid_tile_mask(offs_m, offs_n, q_doc, q_img, k_doc, k_img, q_len, kv_len, q_offset)
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing allowed so far keeps max -inf; subtracting 0 instead avoids (-inf) - (-inf) = nan.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # Rows with no allowed key (cannot happen under the hybrid rule, every token sees itself) output 0.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_in[:, None] & d_in[None, :])
    tl.store(LSE + pid_bh * q_len + offs_m, lse, mask=m_in)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    Q_DOC, Q_IMG, K_DOC, K_IMG,
    Q_COUNT, Q_INDEX, Q_FULL,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    num_heads, num_kv_heads, group, q_len, kv_len, q_offset, q_tiles, kv_tiles, sm_scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    hk = (pid_bh % num_kv_heads).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_in = offs_n < kv_len
    d_in = offs_d < HEAD_DIM
    kv_mask = n_in[:, None] & d_in[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    k_doc = tl.load(K_DOC + b * kv_len + offs_n, mask=n_in, other=0)
    k_img = tl.load(K_IMG + b * kv_len + offs_n, mask=n_in, other=-1)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    tile_row = b * kv_tiles + pid_n
    count = tl.load(Q_COUNT + tile_row)
    # The query heads sharing this KV head accumulate here, so GQA needs no atomics and no expanded K/V.
    for g in range(0, group):
        h = hk * group + g
        for j in range(0, count):
            m = tl.load(Q_INDEX + tile_row * q_tiles + j)
            is_full = tl.load(Q_FULL + tile_row * q_tiles + j)
            offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
            m_in = offs_m < q_len
            q_mask = m_in[:, None] & d_in[None, :]
            q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                        mask=q_mask, other=0.0)
            do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos
                         + offs_d[None, :] * stride_dod, mask=q_mask, other=0.0)
            row = (b * num_heads + h) * q_len + offs_m
            lse = tl.load(LSE + row, mask=m_in, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + row, mask=m_in, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            p = tl.exp2(s - lse[:, None])
            if is_full == 0:
                q_doc = tl.load(Q_DOC + b * q_len + offs_m, mask=m_in, other=0)
                q_img = tl.load(Q_IMG + b * q_len + offs_m, mask=m_in, other=-1)
                allowed = _hybrid_tile_mask(offs_m, offs_n, q_doc, q_img, k_doc, k_img, q_len, kv_len, q_offset)
                p = tl.where(allowed, p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    dk = dk * sm_scale
    out_k = b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd
    tl.store(DK + out_k, dk.to(DK.dtype.element_ty), mask=kv_mask)
    out_v = b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd
    tl.store(DV + out_v, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    Q_DOC, Q_IMG, K_DOC, K_IMG,
    KV_COUNT, KV_INDEX, KV_FULL,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    num_heads, group, q_len, kv_len, q_offset, q_tiles, kv_tiles, sm_scale, scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # int64 batch/head indices: b * stride can pass 2**31 elements on long, wide batches.
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    hk = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_in = offs_m < q_len
    d_in = offs_d < HEAD_DIM
    q_mask = m_in[:, None] & d_in[None, :]
    q_off = b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + pid_bh * q_len + offs_m, mask=m_in, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + pid_bh * q_len + offs_m, mask=m_in, other=0.0)
    q_doc = tl.load(Q_DOC + b * q_len + offs_m, mask=m_in, other=0)
    q_img = tl.load(Q_IMG + b * q_len + offs_m, mask=m_in, other=-1)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    tile_row = b * q_tiles + pid_m
    count = tl.load(KV_COUNT + tile_row)
    for j in range(0, count):
        n = tl.load(KV_INDEX + tile_row * kv_tiles + j)
        is_full = tl.load(KV_FULL + tile_row * kv_tiles + j)
        offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_in = offs_n < kv_len
        kv_mask = n_in[:, None] & d_in[None, :]
        k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        p = tl.exp2(s - lse[:, None])
        if is_full == 0:
            k_doc = tl.load(K_DOC + b * kv_len + offs_n, mask=n_in, other=0)
            k_img = tl.load(K_IMG + b * kv_len + offs_n, mask=n_in, other=-1)
            allowed = _hybrid_tile_mask(offs_m, offs_n, q_doc, q_img, k_doc, k_img, q_len, kv_len, q_offset)
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq_off = b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd
    tl.store(DQ + dq_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (Triton would use TF32 on Ampere+ by default); bf16/fp16 use the
    # tensor cores either way and accumulate in fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


class HybridFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        ids: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        tiles: TileMap,
        num_warps: int,
        num_stages: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, q_len, head_dim = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        q_tiles, kv_tiles = tiles.kv_index.shape[1], tiles.kv_index.shape[2]
        # (B, S, H, D) storage: the caller's transpose(1, 2).reshape(B, S, H*D) is then a free view.
        out = torch.empty(batch, q_len, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
        sm_scale = 1.0 / math.sqrt(head_dim)
        q_doc, q_img, kv_doc, kv_img = ids
        grid = (q_tiles, batch * heads)
        _fwd_kernel[grid](
            q, k, v, out, lse, q_doc, q_img, kv_doc, kv_img,
            tiles.kv_count, tiles.kv_index, tiles.kv_full,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            heads, heads // kv_heads, q_len, kv_len, kv_len - q_len, q_tiles, kv_tiles, sm_scale * LOG2E,
            HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n, PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
        )
        ctx.save_for_backward(q, k, v, out, lse, *ids)
        ctx.tiles, ctx.launch = tiles, (num_warps, num_stages)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, d_out: torch.Tensor, _d_lse: torch.Tensor | None):
        q, k, v, out, lse, q_doc, q_img, kv_doc, kv_img = ctx.saved_tensors
        tiles: TileMap = ctx.tiles
        num_warps, num_stages = ctx.launch
        batch, heads, q_len, head_dim = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        q_tiles, kv_tiles = tiles.kv_index.shape[1], tiles.kv_index.shape[2]
        d_out = d_out.to(q.dtype)
        # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij: the softmax-backward correction, O(S*D) work.
        delta = (d_out.float() * out.float()).sum(-1).contiguous()
        # Gradients in (B, S, H, D) storage like the output; the kernels take any strides.
        dq = torch.empty(batch, q_len, heads, head_dim, dtype=q.dtype, device=q.device).transpose(1, 2)
        dk = torch.empty(batch, kv_len, kv_heads, head_dim, dtype=k.dtype, device=k.device).transpose(1, 2)
        dv = torch.empty(batch, kv_len, kv_heads, head_dim, dtype=v.dtype, device=v.device).transpose(1, 2)
        sm_scale = 1.0 / math.sqrt(head_dim)
        common = dict(
            HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n, PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
        )
        _bwd_dkdv_kernel[(kv_tiles, batch * kv_heads)](
            q, k, v, d_out, lse, delta, dk, dv, q_doc, q_img, kv_doc, kv_img,
            tiles.q_count, tiles.q_index, tiles.q_full,
            *_strides(q), *_strides(k), *_strides(v), *_strides(d_out), *_strides(dk), *_strides(dv),
            heads, kv_heads, heads // kv_heads, q_len, kv_len, kv_len - q_len, q_tiles, kv_tiles,
            sm_scale, sm_scale * LOG2E, **common,
        )
        _bwd_dq_kernel[(q_tiles, batch * heads)](
            q, k, v, d_out, lse, delta, dq, q_doc, q_img, kv_doc, kv_img,
            tiles.kv_count, tiles.kv_index, tiles.kv_full,
            *_strides(q), *_strides(k), *_strides(v), *_strides(d_out), *_strides(dq),
            heads, heads // kv_heads, q_len, kv_len, kv_len - q_len, q_tiles, kv_tiles,
            sm_scale, sm_scale * LOG2E, **common,
        )
        return dq, dk, dv, None, None, None, None


def hybrid_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_doc: torch.Tensor,
    q_img: torch.Tensor,
    kv_doc: torch.Tensor,
    kv_img: torch.Tensor,
    tiles: TileMap | None = None,
    block_m: int = 64,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, H, S_q, D), natural log-sum-exp (B, H, S_q) fp32) of softmax(QK^T / sqrt(D)) V under the
    hybrid rule. q: (B, H, S_q, D); k, v: (B, H_kv, S_k, D), H a multiple of H_kv; ids (B, S_q) / (B, S_k), the
    queries being the last S_q keys. `tiles` (built from the same ids and block sizes) can be passed to share it
    between layers."""
    check_devices("hybrid_flash_attention", q, k, v)
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if k.shape != v.shape or q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if tiles is None:
        tiles = build_tile_map(q_doc, q_img, kv_doc, kv_img, block_m, block_n)
    if (tiles.q_len, tiles.kv_len) != (q.shape[2], k.shape[2]):
        raise ValueError(f"tile map is for {(tiles.q_len, tiles.kv_len)} tokens, got {(q.shape[2], k.shape[2])}")
    dtype = q.dtype
    q, k, v = interpreter_dtype(q), interpreter_dtype(k), interpreter_dtype(v)
    ids = tuple(t.to(torch.int32).contiguous() for t in (q_doc, q_img, kv_doc, kv_img))
    out, lse = HybridFlashAttention.apply(q, k, v, ids, tiles, num_warps, num_stages)
    return out.to(dtype), lse
