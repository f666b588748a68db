"""benchmarks/tp_comm.py at small widths: the collectives of one tensor-parallel step (counted in both processes
while DTensor runs them) equal the analytic count and payload, for every separation, tied and untied."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.distributed import REPO, cpu_env


@pytest.mark.slow
def test_tp_collectives_match_the_analytic_count() -> None:
    args = ["--tp=2", "--separation=all", "--embeddings=both", "--layers=2", "--hidden=64", "--heads=4",
            "--kv-heads=2", "--intermediate=128", "--vocab=256", "--seq=32"]
    proc = subprocess.run([sys.executable, "benchmarks/tp_comm.py", *args], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=300)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all counts and payloads match the analytic ones" in proc.stdout
    assert proc.stdout.count("separation=") == 6
