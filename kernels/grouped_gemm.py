"""Modality-routed grouped GEMM in Triton: rows [0, split) go through one weight, rows [split, rows) through the
other, in one launch (forward, grad input and grad weight).

`ModalityRouter` keeps tokens as [text rows | image rows], so routing a linear layer is a GEMM over two
contiguous row segments with two weight matrices. The launch grid enumerates the row tiles of segment 0 and then
those of segment 1; each program picks its segment's weight, so there is no gather, no padding to a common
size and no second launch. A tile never straddles the split: both segments are tiled from their own start.

This module imports triton at import time; `megafusion.kernels` imports it only when a kernel is called.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megafusion.kernels._triton import check_devices, interpreter_dtype


@triton.jit
def _segment_matmul(A, B, row_start, row_end, offs_n, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) tile of A[row_start:row_end] @ B, B being (K, N) through its strides."""
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(A + offs_m[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(offs_m[:, None] < row_end) & (ks[None, :] < K), other=0.0)
        b = tl.load(B + ks[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(ks[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
    return acc


@triton.jit
def _grouped_matmul_kernel(
    A, B0, B1, C, rows, split, N, K,
    stride_am, stride_ak, stride_b0k, stride_b0n, stride_b1k, stride_b1n, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """C[r] = A[r] @ B0 for r < split, A[r] @ B1 otherwise; B0, B1 are (K, N) through their strides."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    tiles0 = tl.cdiv(split, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if pid_m < tiles0:
        row_start = pid_m * BLOCK_M
        row_end = split
        acc = _segment_matmul(A, B0, row_start, row_end, offs_n, N, K, stride_am, stride_ak, stride_b0k,
                              stride_b0n, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    else:
        row_start = split + (pid_m - tiles0) * BLOCK_M
        row_end = rows
        acc = _segment_matmul(A, B1, row_start, row_end, offs_n, N, K, stride_am, stride_ak, stride_b1k,
                              stride_b1n, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    tl.store(C + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc.to(C.dtype.element_ty),
             mask=(offs_m[:, None] < row_end) & (offs_n[None, :] < N))


@triton.jit
def _segment_weight_grad(DY, X, row_start, row_end, offs_n, offs_k, N, K, stride_dym, stride_dyn, stride_xm,
                         stride_xk, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                         PRECISION: tl.constexpr):
    """fp32 (BLOCK_N, BLOCK_K) tile of DY[seg]^T @ X[seg], reducing over the segment's rows."""
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rs = r0 + offs_r
        r_in = rs < row_end
        dy = tl.load(DY + rs[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=r_in[:, None] & (offs_n[None, :] < N), other=0.0)
        x = tl.load(X + rs[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=r_in[:, None] & (offs_k[None, :] < K), other=0.0)
        acc += tl.dot(tl.trans(dy), x, input_precision=PRECISION)
    return acc


@triton.jit
def _grouped_weight_grad_kernel(
    DY, X, DW0, DW1, rows, split, N, K, first_segment,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """DW_g = DY[seg g]^T @ X[seg g], (N, K) like nn.Linear.weight; grid axis 2 = segment - first_segment, so a
    frozen segment (no grad wanted) is simply not launched."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    segment = tl.program_id(2) + first_segment
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    out = offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    out_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if segment == 0:
        acc = _segment_weight_grad(DY, X, 0, split, offs_n, offs_k, N, K, stride_dym, stride_dyn, stride_xm,
                                   stride_xk, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION)
        tl.store(DW0 + out, acc.to(DW0.dtype.element_ty), mask=out_mask)
    else:
        acc = _segment_weight_grad(DY, X, split, rows, offs_n, offs_k, N, K, stride_dym, stride_dyn, stride_xm,
                                   stride_xk, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION)
        tl.store(DW1 + out, acc.to(DW1.dtype.element_ty), mask=out_mask)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def grouped_matmul(
    a: torch.Tensor, b0: torch.Tensor, b1: torch.Tensor, split: int, blocks: tuple[int, int, int] = (64, 64, 32)
) -> torch.Tensor:
    """(rows, N) = [a[:split] @ b0 ; a[split:] @ b1] with b0, b1 (K, N) (any strides: a transposed weight is a
    view)."""
    rows, k = a.shape
    n = b0.shape[1]
    block_m, block_n, block_k = blocks
    out = torch.empty(rows, n, dtype=a.dtype, device=a.device)
    tiles = triton.cdiv(split, block_m) + triton.cdiv(rows - split, block_m)
    _grouped_matmul_kernel[(tiles, triton.cdiv(n, block_n))](
        a, b0, b1, out, rows, split, n, k,
        a.stride(0), a.stride(1), b0.stride(0), b0.stride(1), b1.stride(0), b1.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=_precision(a.dtype),
    )
    return out


def grouped_weight_grad(
    dy: torch.Tensor,
    x: torch.Tensor,
    split: int,
    need: tuple[bool, bool],
    blocks: tuple[int, int, int] = (64, 32, 32),
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dW0, dW1), each (N, K) = dy[seg]^T @ x[seg]; a segment whose flag in `need` is False gets None and costs
    nothing (frozen text weights)."""
    rows, n = dy.shape
    k = x.shape[1]
    block_n, block_k, block_r = blocks
    dw0 = torch.empty(n, k, dtype=x.dtype, device=x.device) if need[0] else None
    dw1 = torch.empty(n, k, dtype=x.dtype, device=x.device) if need[1] else None
    if not (need[0] or need[1]):
        return None, None
    first = 0 if need[0] else 1
    segments = int(need[0]) + int(need[1])
    placeholder = dw0 if dw0 is not None else dw1
    _grouped_weight_grad_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k), segments)](
        dy, x, placeholder if dw0 is None else dw0, placeholder if dw1 is None else dw1, rows, split, n, k, first,
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), placeholder.stride(0), placeholder.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r, PRECISION=_precision(x.dtype),
    )
    return dw0, dw1


class GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        split: int,
        w0: torch.Tensor,
        w1: torch.Tensor,
        blocks: tuple[int, int, int],
    ) -> torch.Tensor:
        ctx.save_for_backward(x, w0, w1)
        ctx.split, ctx.blocks = split, blocks
        # nn.Linear computes x @ W^T: pass W^T as a strided view, no copy.
        return grouped_matmul(x, w0.t(), w1.t(), split, blocks)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, dy: torch.Tensor):
        x, w0, w1 = ctx.saved_tensors
        need_x, _, need_w0, need_w1, _ = ctx.needs_input_grad
        dy = dy.to(x.dtype)
        dx = grouped_matmul(dy, w0, w1, ctx.split, ctx.blocks) if need_x else None
        dw0, dw1 = grouped_weight_grad(dy, x, ctx.split, (need_w0, need_w1))
        return dx, None, dw0, dw1, None


def grouped_linear(
    x: torch.Tensor,
    split: int,
    w0: torch.Tensor,
    w1: torch.Tensor,
    blocks: tuple[int, int, int] = (64, 64, 32),
) -> torch.Tensor:
    """[F.linear(x[:split], w0) ; F.linear(x[split:], w1)] in one launch; x (rows, in), weights (out, in)."""
    check_devices("grouped_linear", x, w0, w1)
    if x.dim() != 2:
        raise ValueError(f"grouped_linear expects (rows, features), got shape {tuple(x.shape)}")
    if w0.shape != w1.shape or w0.shape[1] != x.shape[1]:
        raise ValueError(f"weights {tuple(w0.shape)} / {tuple(w1.shape)} do not fit input {tuple(x.shape)}")
    if not x.dtype == w0.dtype == w1.dtype:
        raise ValueError(f"dtypes differ: input {x.dtype}, weights {w0.dtype} / {w1.dtype}")
    if not 0 <= split <= x.shape[0]:
        raise ValueError(f"split {split} outside [0, {x.shape[0]}]")
    dtype = x.dtype
    x, w0, w1 = interpreter_dtype(x), interpreter_dtype(w0), interpreter_dtype(w1)
    return GroupedLinear.apply(x, split, w0, w1, blocks).to(dtype)
