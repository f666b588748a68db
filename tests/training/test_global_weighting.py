"""Losses are sums over tokens divided by the global count: one optimizer step with gradient accumulation 4 on 2
ranks, over micro-batches of very different text-target and image counts, gives the gradients of one process over
the concatenated batch (plain autograd, no engine)."""

import json

import pytest

from tests.distributed import run_distributed


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 2])
def test_accumulated_gradients_equal_one_process_over_the_concatenated_batch(tmp_path, zero):
    out = tmp_path / "result.json"
    run_distributed(["tests/training/global_weighting_worker.py", f"--zero={zero}", f"--out={out}",
                     f"--workdir={tmp_path / 'run'}"], world_size=2)
    result = json.loads(out.read_text())
    assert result["names"] == result["reference_names"] and result["names"], "compared different parameter sets"
    # The micro-batches really differ, or per-micro-batch and global normalisation could not be told apart.
    assert len(set(result["text_targets"])) > 4 and len(set(result["latent_elements"])) == 4
    assert result["max_rel_vs_global_reference"] < 1e-5
    assert result["max_rel_vs_per_micro_mean"] > 1e-2, "the reference cannot tell the two normalisations apart"
