"""This machine's dense matmul peak, the number to put in `train.peak_tflops` (the denominator of the trainer's MFU).

Times square C = A @ B (2*n^3 FLOPs) in fp32 and bf16 on preallocated operands, writing into a preallocated output,
so the clock sees only the matmul: no allocation, no random fill, no copy. Each repeat runs enough back-to-back
matmuls to last about `--min-time` seconds; the median repeat is reported (robust to a neighbour's burst on a shared
machine), and the peak of a dtype is its best size.

    python benchmarks/matmul_peak.py [--sizes 1024 2048] [--repeats 5] [--device cpu|cuda] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> Callable[[], None]:
    # GPU kernels are asynchronous: without a sync the clock would stop before the work is done.
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_matmul(n: int, dtype: torch.dtype, device: torch.device, repeats: int, min_time: float) -> list[float]:
    """Seconds per matmul of each repeat."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device).to(dtype)
    b = torch.randn(n, n, generator=g, device=device).to(dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    sync = _sync(device)
    # Warm-up: thread pools, kernel selection, caches and clocks settle before anything is timed.
    for _ in range(2):
        torch.mm(a, b, out=out)
    sync()
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    sync()
    iters = max(1, math.ceil(min_time / max(time.perf_counter() - start, 1e-9)))
    per_call = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        sync()
        per_call.append((time.perf_counter() - start) / iters)
    return per_call


def measure(sizes: list[int], dtypes: list[str], device: torch.device, repeats: int,
            min_time: float) -> dict[str, dict[int, float]]:
    """GFLOP/s (median repeat) per dtype name and size."""
    results: dict[str, dict[int, float]] = {}
    for name in dtypes:
        results[name] = {}
        for n in sizes:
            seconds = statistics.median(time_matmul(n, DTYPES[name], device, repeats, min_time))
            results[name][n] = 2 * n**3 / seconds / 1e9
    return results


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-time", type=float, default=0.25, help="seconds per repeat (default 0.25)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    # Other work on the machine lowers the numbers; say how busy it was so a low result can be read as such.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results = measure(args.sizes, args.dtypes, device, args.repeats, args.min_time)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"matmul peak on {label} (torch {torch.__version__}), median of {args.repeats} repeats")
    if load is not None and device.type == "cpu" and load > 0.5:
        print(f"  note: 1-min load average was {load:.1f} on {os.cpu_count()} CPUs before the run; "
              "other processes lower these numbers")
    for name, by_size in results.items():
        for n, gflops in by_size.items():
            print(f"  {name:5s} {n:5d}^3  {gflops:9.1f} GFLOP/s")
    peaks = {name: max(by_size.values()) for name, by_size in results.items()}
    for name, gflops in peaks.items():
        print(f"peak {name}: {gflops:.1f} GFLOP/s  (train.peak_tflops: {gflops / 1e3:.4g} for {name} runs)")
    ratio = peaks["bf16"] / peaks["fp32"] if {"bf16", "fp32"} <= peaks.keys() else None
    if ratio is not None:
        print(f"bf16/fp32 ratio: {ratio:.2f}")
    report: dict[str, object] = {
        "device": label,
        "torch": torch.__version__,
        "repeats": args.repeats,
        "load_average_1min": None if load is None else round(load, 2),
        "gflops": {name: {str(n): round(v, 1) for n, v in by_size.items()} for name, by_size in results.items()},
        "peak_gflops": {name: round(v, 1) for name, v in peaks.items()},
        "peak_tflops": {name: round(v / 1e3, 4) for name, v in peaks.items()},
        "bf16_fp32_ratio": None if ratio is None else round(ratio, 3),
    }
    if args.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
