"""`precision: auto`: bf16 only where this device multiplies bf16 clearly faster than fp32, decided by measuring.

CPUs of the same machine kind differ: with AMX or AVX-512 BF16, bf16 matmuls run at 2-3x fp32; with AVX2 only,
torch's bf16 matmul is emulated and about 40x slower than fp32. So on CPU a short probe times both dtypes at the
model's own matmul shapes (a few hundred milliseconds) and picks bf16 only when it wins by `BF16_MARGIN`.
On CUDA, bf16 is chosen where the device supports it natively."""

from __future__ import annotations

import platform
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# bf16 must beat fp32 by this factor: halving activation memory is not worth a slower step on a CPU.
BF16_MARGIN = 1.2
# CPU features that decide bf16 speed, reported beside every choice.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")

# A probe returns GFLOP/s of (fp32, bf16) matmuls.
Probe = Callable[[Sequence[tuple[int, int, int]], int], tuple[float, float]]


@dataclass
class PrecisionChoice:
    requested: str
    precision: str  # fp32 | bf16
    reason: str
    fp32_gflops: float | None = None
    bf16_gflops: float | None = None
    cpu: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


def cpu_info() -> dict[str, Any]:
    """CPU model, the flags that decide bf16 speed, and torch's thread count."""
    model, flags = platform.processor() or "unknown", set()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        model = found.group(1).strip() if found else model
        found = re.search(r"^Flags:\s*(.+)$", out, re.MULTILINE)
        flags = set(found.group(1).split()) if found else set()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags], "torch_threads": torch.get_num_threads()}


def probe_matmul(shapes: Sequence[tuple[int, int, int]], repeats: int = 3) -> tuple[float, float]:
    """GFLOP/s of fp32 and bf16 (m, k) x (k, n) products at `shapes`, in nn.Linear's layout (input @ weight.T,
    weight stored (n, k)): on an AVX2-only CPU bf16 `a @ b` measured 1.1 GFLOP/s where `a @ w.T` of the same size
    ran at 17, so the layout the model uses is the one to measure. Best of up to `repeats` per shape, fewer when
    one call already takes 40 ms, so an emulated bf16 (40x slower) still costs under a second in total."""
    rates = []
    for dtype in (torch.float32, torch.bfloat16):
        flops = seconds = 0.0
        F.linear(torch.ones(32, 32, dtype=dtype), torch.ones(32, 32, dtype=dtype))  # thread pool, kernel choice
        for m, k, n in shapes:
            a, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                F.linear(a, w)
                best = min(best, time.perf_counter() - start)
                if best > 0.04:
                    break
            flops += 2.0 * m * k * n
            seconds += best
        rates.append(flops / max(seconds, 1e-12) / 1e9)
    return rates[0], rates[1]


def model_matmul_shapes(hidden: int, intermediate: int, tokens: int = 64) -> list[tuple[int, int, int]]:
    """The projections a Llama layer spends its time in (Q/O and the FFN), at `tokens` rows."""
    return [(tokens, hidden, hidden), (tokens, hidden, intermediate), (tokens, intermediate, hidden)]


def choose_precision(
    requested: str,
    device: torch.device | str = "cpu",
    shapes: Sequence[tuple[int, int, int]] = ((64, 576, 1536),),
    probe: Probe | None = None,
) -> PrecisionChoice:
    """`fp32`/`bf16` are respected as given; `auto` measures (CPU) or asks the device (CUDA)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision: must be one of {PRECISIONS}, got {requested!r}")
    device = torch.device(device)
    cpu = cpu_info() if device.type == "cpu" else {}
    if requested != "auto":
        return PrecisionChoice(requested, requested, "explicit", cpu=cpu)
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
        return PrecisionChoice(requested, "bf16" if fast else "fp32",
                               "CUDA device supports bf16" if fast else "CUDA device lacks native bf16", cpu=cpu)
    if device.type != "cpu":
        return PrecisionChoice(requested, "fp32", f"no bf16 probe for device type {device.type}")
    fp32, bf16 = (probe or probe_matmul)(shapes, 3)
    faster = bf16 >= BF16_MARGIN * fp32
    reason = (f"measured bf16 {bf16:.1f} vs fp32 {fp32:.1f} GFLOP/s: "
              + ("bf16 is clearly faster" if faster else f"bf16 is not {BF16_MARGIN}x faster"))
    return PrecisionChoice(requested, "bf16" if faster else "fp32", reason, fp32, bf16, cpu)
