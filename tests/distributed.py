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


def serve_worker_cases(run_case) -> None:  # noqa: ANN001 (a per-worker callable: spec string -> JSON-able dict)
    """main() of a torchrun worker script: `--out FILE CASE...`; runs every case on every rank (gloo, 1 thread)
    and rank 0 writes the list of results as JSON."""
    import argparse
    import faulthandler
    import json

    import torch
    import torch.distributed as dist

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("cases", nargs="+")
    p.add_argument("--hang-timeout", type=float, default=240)
    args = p.parse_args()
    # A collective mismatch hangs every rank silently: dump the stacks and exit instead.
    faulthandler.dump_traceback_later(args.hang_timeout, exit=True)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = [run_case(spec) for spec in args.cases]
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


def run_worker_launch(worker: str, processes: int, cases: list[str], out: Path, **env: str) -> list[dict]:
    """One torchrun launch of a `serve_worker_cases` script over `cases`; returns its results (one per case)."""
    import json
    import time

    start = time.perf_counter()
    run_distributed([worker, f"--out={out}", *cases], world_size=processes, timeout=300, **env)
    results = json.loads(Path(out).read_text())
    print(f"{worker} x {processes}: {time.perf_counter() - start:.1f} s wall for {len(results)} cases")
    assert len(results) == len(cases)
    return results
