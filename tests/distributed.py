"""Launch helpers for multi-process tests: torchrun with the gloo backend on CPU (DeepSpeed DS_ACCELERATOR=cpu)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                "TOKENIZERS_PARALLELISM": "false"})
    env.update(extra)
    return env


def run_distributed(script_args: list[str], world_size: int = 2, timeout: float = 600,
                    **env: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node world_size <script_args>`; raises with both output streams on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}",
           f"--master_port={free_port()}", *script_args]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(**env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def megafusion_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "megafusion", *args]
