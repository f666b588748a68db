"""Triton is optional: nothing here imports it until a kernel is actually called."""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    """True when `import triton` works (a broken install counts as absent, so `auto` falls back cleanly)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the machine
        return False
    return True


def interpreting() -> bool:
    """TRITON_INTERPRET=1 runs kernels on CPU tensors through Triton's numpy interpreter (tests only: slow)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def require_triton(what: str) -> None:
    if not triton_available():
        raise ModuleNotFoundError(
            f"{what} needs Triton, which is not installed: `pip install triton` (or megafusion[gpu]), "
            "or choose the pure-torch backend (attention='sdpa' / 'flex', routing='index')"
        )


def check_devices(what: str, *tensors: torch.Tensor) -> None:
    """Compiled Triton kernels run on CUDA only; on CPU they run solely under the interpreter."""
    if interpreting():
        if any(t.is_cuda for t in tensors):
            raise RuntimeError(f"{what}: TRITON_INTERPRET=1 runs kernels on CPU tensors only")
        return
    if not all(t.is_cuda for t in tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"{what}: Triton kernels need CUDA tensors, got {devices}; on CPU use attention='sdpa'/'flex' and "
            "routing='index' (or set TRITON_INTERPRET=1 before importing triton, for testing)"
        )


def interpreter_dtype(t: torch.Tensor) -> torch.Tensor:
    """The interpreter has no bf16/fp16 arithmetic: compute in fp32 there (fp32 accumulation either way)."""
    return t.float() if interpreting() and t.dtype in (torch.bfloat16, torch.float16) else t
