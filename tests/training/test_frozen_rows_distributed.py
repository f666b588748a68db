"""The frozen-row split under FSDP2 (dp2, gloo): ranks whose micro-batches differ in whether anything can be split
still agree (no hang), and the gradients equal one process's full computation."""

from __future__ import annotations

import json

import pytest

from tests.distributed import run_distributed
from tests.helpers import save_tiny_llama

pytestmark = pytest.mark.slow


def test_fsdp_ranks_agree_on_the_split_and_gradients_match(tmp_path):
    save_tiny_llama(tmp_path / "base")
    out = tmp_path / "result.json"
    run_distributed(["tests/training/frozen_rows_worker.py", f"--base={tmp_path / 'base'}", f"--out={out}"],
                    world_size=2, timeout=300)
    result = json.loads(out.read_text())
    print(result)
    # Rank 1 has nothing to split in round 0, so neither rank splits; in round 1 both do.
    assert result["round0"]["split"] == [False, False]
    assert result["round1"]["split"] == [True, True]
    for round_ in ("round0", "round1"):
        assert result[round_]["worst_rel"] < 1e-5, result
