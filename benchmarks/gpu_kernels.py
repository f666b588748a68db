"""Hybrid-mask attention and routed GEMM throughput on a CUDA GPU: the Triton kernels against SDPA (dense boolean
mask), compiled FlexAttention, and flash-attn when installed, on the packed layouts of attention_kernels.py.

    python benchmarks/gpu_kernels.py [--lengths 1024 4096 8192 --dtype bf16 --heads 32 --kv-heads 8 --head-dim 128]
    python benchmarks/gpu_kernels.py --dry-run     # no GPU needed: layouts, allowed pairs, tile skip fractions

TFLOP/s are *useful* FLOPs over time: attention forward = 4 * B * H * D * (allowed (query, key) pairs of that
method's own mask), forward + backward = 3.5x that (FlashAttention-2's convention: the backward is 2.5x the
forward, recomputation included). flash-attn cannot express bidirectional attention inside an image, so it runs
per-document causal attention (varlen), a *different, slightly smaller* mask: it is a speed reference, not an
equivalent. The grouped GEMM is compared with two cuBLAS matmuls (index routing) at 2 * rows * in * out FLOPs.
Exits with a message when CUDA (or Triton) is not available.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attention_kernels import packed_layout  # noqa: E402
from megafusion.kernels import triton_available  # noqa: E402
from megafusion.kernels.reference import dense_hybrid_mask  # noqa: E402
from megafusion.kernels.tile_map import build_tile_map  # noqa: E402


def cuda_time(fn: Callable[[], object], warmup: int = 5, repeats: int = 20) -> float:
    """Median seconds per call, CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def fwd_bwd(fn: Callable[[], torch.Tensor], grad: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    def step() -> None:
        out = fn()
        torch.autograd.grad(out, inputs, grad)

    return step


def report(name: str, seconds: float, flops: float) -> None:
    print(f"    {name:<44s} {seconds * 1e3:9.3f} ms  {flops / seconds / 1e12:7.1f} TFLOP/s")


def attention_bench(seq: int, args: argparse.Namespace, dtype: torch.dtype) -> None:
    from megafusion.kernels import hybrid_flash_attention
    from megafusion.kernels.flex import flex_hybrid_attention, flex_layout

    layout = packed_layout(seq)
    device = torch.device("cuda")
    doc, img = layout.doc_ids.to(device), layout.image_ids.to(device)
    ids = (doc, img, doc, img)
    dense = dense_hybrid_mask(*ids)
    pairs = int(dense.sum())
    tiles = build_tile_map(*ids, args.block, args.block)
    print(f"\n== {seq} tokens, {layout.num_images} images, {int(doc.max()) + 1} documents, mask density "
          f"{pairs / seq**2:.3f}; triton tiles {args.block}: skipped {tiles.skipped_fraction():.3f}, "
          f"full {tiles.full_fraction():.3f}")
    g = torch.Generator(device=device).manual_seed(0)

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(1, heads, seq, args.head_dim, device=device, dtype=dtype, generator=g).requires_grad_(True)

    q, k, v = rand(args.heads), rand(args.kv_heads), rand(args.kv_heads)
    grad = torch.randn_like(q)
    fwd_flops = 4.0 * args.heads * args.head_dim * pairs
    gqa = args.heads != args.kv_heads

    def triton_fn() -> torch.Tensor:
        return hybrid_flash_attention(q, k, v, *ids, tiles=tiles)[0]

    def sdpa_fn() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None], enable_gqa=gqa)

    flex = flex_layout(*ids)

    def flex_fn() -> torch.Tensor:
        return flex_hybrid_attention(q, k, v, flex, compile=True)

    reference = sdpa_fn()
    for name, fn in (("triton", triton_fn), ("flex", flex_fn)):
        err = float((fn().float() - reference.float()).abs().max() / reference.float().abs().max())
        print(f"    {name} vs SDPA max relative difference {err:.1e}")
    with torch.no_grad():
        report("forward   triton hybrid kernel", cuda_time(triton_fn), fwd_flops)
        report("forward   SDPA + dense bool mask", cuda_time(sdpa_fn), fwd_flops)
        report("forward   FlexAttention (compiled)", cuda_time(flex_fn), fwd_flops)
    report("fwd+bwd   triton hybrid kernel", cuda_time(fwd_bwd(triton_fn, grad, (q, k, v))), 3.5 * fwd_flops)
    report("fwd+bwd   SDPA + dense bool mask", cuda_time(fwd_bwd(sdpa_fn, grad, (q, k, v))), 3.5 * fwd_flops)
    report("fwd+bwd   FlexAttention (compiled)", cuda_time(fwd_bwd(flex_fn, grad, (q, k, v))), 3.5 * fwd_flops)

    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        print("    flash-attn not installed: skipped")
        return
    # Per-document causal attention: flash-attn's closest mask (no bidirectional image blocks).
    lengths = torch.bincount(doc[0] - doc[0].min())
    lengths = lengths[lengths > 0]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(lengths, 0)
    causal_pairs = int((lengths * (lengths + 1) // 2).sum())
    qf, kf, vf = (t.detach()[0].transpose(0, 1).contiguous().requires_grad_(True) for t in (q, k, v))
    max_len = int(lengths.max())

    def fa_fn() -> torch.Tensor:
        return flash_attn_varlen_func(qf, kf, vf, cu, cu, max_len, max_len, causal=True)

    fa_flops = 4.0 * args.heads * args.head_dim * causal_pairs
    with torch.no_grad():
        report("forward   flash-attn varlen causal (other mask)", cuda_time(fa_fn), fa_flops)
    report("fwd+bwd   flash-attn varlen causal (other mask)",
           cuda_time(fwd_bwd(fa_fn, torch.randn_like(qf), (qf, kf, vf))), 3.5 * fa_flops)


def gemm_bench(args: argparse.Namespace, dtype: torch.dtype) -> None:
    from megafusion.kernels import grouped_linear

    device = torch.device("cuda")
    rows, split = args.gemm_rows, args.gemm_rows // 2
    print(f"\n== routed GEMM: {rows} rows ({split} text / {rows - split} image), {args.hidden} -> {args.ffn}")
    x = torch.randn(rows, args.hidden, device=device, dtype=dtype, requires_grad=True)
    w0 = torch.randn(args.ffn, args.hidden, device=device, dtype=dtype, requires_grad=True)
    w1 = torch.randn(args.ffn, args.hidden, device=device, dtype=dtype, requires_grad=True)
    flops = 2.0 * rows * args.hidden * args.ffn

    def grouped() -> torch.Tensor:
        return grouped_linear(x, split, w0, w1)

    def index() -> torch.Tensor:
        return torch.cat((F.linear(x[:split], w0), F.linear(x[split:], w1)))

    grad = torch.randn(rows, args.ffn, device=device, dtype=dtype)
    with torch.no_grad():
        report("forward   triton grouped GEMM (1 launch)", cuda_time(grouped), flops)
        report("forward   index routing (2 cuBLAS matmuls)", cuda_time(index), flops)
    report("fwd+bwd   triton grouped GEMM", cuda_time(fwd_bwd(grouped, grad, (x, w0, w1))), 3 * flops)
    report("fwd+bwd   index routing", cuda_time(fwd_bwd(index, grad, (x, w0, w1))), 3 * flops)


def dry_run(args: argparse.Namespace) -> None:
    """What the GPU run would measure, computed on CPU (no timing)."""
    for seq in args.lengths:
        layout = packed_layout(seq)
        ids = (layout.doc_ids, layout.image_ids, layout.doc_ids, layout.image_ids)
        pairs = int(dense_hybrid_mask(*ids).sum())
        tiles = build_tile_map(*ids, args.block, args.block)
        print(f"{seq:6d} tokens: {layout.num_images:3d} images, allowed pairs {pairs} (density {pairs / seq**2:.3f}), "
              f"forward {4.0 * args.heads * args.head_dim * pairs / 1e9:.1f} GFLOP; tiles {args.block}: skipped "
              f"{tiles.skipped_fraction():.3f}, full {tiles.full_fraction():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=64, help="Triton tile (query and key) of the launch")
    parser.add_argument("--gemm-rows", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--dry-run", action="store_true", help="no GPU: print layouts, FLOPs and tile skips only")
    args = parser.parse_args()
    if args.dry_run:
        dry_run(args)
        return
    if not torch.cuda.is_available():
        sys.exit("gpu_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False on this machine); "
                 "run benchmarks/attention_kernels.py for the CPU comparison, or --dry-run for the layouts")
    if not triton_available():
        sys.exit("gpu_kernels.py needs Triton: pip install triton (or megafusion[gpu])")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, {args.heads} query / "
          f"{args.kv_heads} KV heads, head_dim {args.head_dim}")
    for seq in args.lengths:
        attention_bench(seq, args, dtype)
    gemm_bench(args, dtype)


if __name__ == "__main__":
    main()
