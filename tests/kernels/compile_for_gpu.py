"""Compiles every Triton kernel of megafusion.kernels for a CUDA target, without a GPU: Triton's full lowering
(TTIR -> TTGIR -> LLVM -> PTX -> cubin via the bundled ptxas) runs on the host. The interpreter tests check the
arithmetic; this checks the kernels are valid GPU programs (dot shapes, layouts, shared memory, dtypes such as
bf16 that the interpreter cannot run). Run in a process without TRITON_INTERPRET.

    python -m tests.kernels.compile_for_gpu [--dtype bf16|fp32] [--arch 80]
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--arch", type=int, default=80, help="CUDA compute capability, e.g. 80 (A100), 90 (H100)")
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from megafusion.kernels import flash_attention as fa
    from megafusion.kernels import grouped_gemm as gg

    data = f"*{args.dtype}"
    ids = ("Q_DOC", "Q_IMG", "K_DOC", "K_IMG", "KV_COUNT", "KV_INDEX", "KV_FULL", "Q_COUNT", "Q_INDEX", "Q_FULL")
    attention_types = {name: data for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    attention_types.update({name: "*fp32" for name in ("LSE", "DELTA")})
    attention_types.update({name: "*i32" for name in ids})
    attention_types.update({name: "fp32" for name in ("scale_log2", "sm_scale")})
    gemm_types = {name: data for name in ("A", "B0", "B1", "C", "DY", "X", "DW0", "DW1")}
    precision = "ieee" if args.dtype == "fp32" else "tf32"
    attention = {"HEAD_DIM": args.head_dim, "BLOCK_D": args.head_dim, "BLOCK_M": 64, "BLOCK_N": 64,
                 "PRECISION": precision}
    kernels = [
        (fa._fwd_kernel, attention, attention_types),
        (fa._bwd_dkdv_kernel, attention, attention_types),
        (fa._bwd_dq_kernel, attention, attention_types),
        (gg._grouped_matmul_kernel, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "PRECISION": precision},
         gemm_types),
        (gg._grouped_weight_grad_kernel, {"BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_R": 32, "PRECISION": precision},
         gemm_types),
    ]
    target = GPUTarget("cuda", args.arch, 32)
    for kernel, constexprs, types in kernels:
        # Every non-constexpr argument that is not a pointer or a float scale is an int32 scalar (sizes, strides).
        signature = {name: "constexpr" if name in constexprs else types.get(name, "i32")
                     for name in kernel.arg_names}
        compiled = compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target,
                           options={"num_warps": 4, "num_stages": 2})
        print(f"{kernel.__name__}: sm_{args.arch} {args.dtype} ok, shared memory {compiled.metadata.shared} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
