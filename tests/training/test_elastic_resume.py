"""Resuming on another layout at the training level: a DeepSpeed run resumed on fewer ranks (ZeRO 0, whose state
reshards) continues from the merged loader record of both ranks, of which nothing is lost; what DeepSpeed cannot
reshard is refused in one line; the torch engine's data streams refuse changed data."""

import json
import math
import subprocess

import pytest
import torch

from megafusion.data_pipeline.epoch_order import ConsumedPositions
from megafusion.data_pipeline.loader import DataChangedError, build_loader, merge_loader_states
from megafusion.training.data_streams import DataStreams
from tests.data_pipeline.shard_helpers import make_latent_shards
from tests.data_pipeline.test_loader import _stream
from tests.distributed import REPO, cpu_env, megafusion_command, run_distributed


def _consumed(step_dir, ranks) -> ConsumedPositions:
    merged = merge_loader_states([torch.load(step_dir / f"rank{r}.pt", weights_only=True)["loader"]
                                  for r in range(ranks)])
    return ConsumedPositions.from_state(merged["order"][2], merged["consumed"])


@pytest.mark.slow
def test_two_rank_run_resumes_on_one_rank(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--config", "configs/tiny-cpu.yaml", f"--train.output_dir={out}", "--train.zero_stage=0",
            "--train.save_every=2", "--no-progress"]
    run_distributed(["-m", "megafusion", *args, "--train.max_steps=2"], world_size=2, timeout=300)
    proc = subprocess.run(megafusion_command([*args, "--train.max_steps=4"]), cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written with 2 ranks, resuming with 1" in proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records)
    before = _consumed(out / "checkpoints" / "step-00000002", ranks=2)
    after = _consumed(out / "checkpoints" / "step-00000004", ranks=1)
    # Everything both ranks had consumed stays consumed, and the one rank went on from there.
    for epoch, spans in before.intervals.items():
        for a, b in spans:
            assert after.next_free(epoch, a) >= b, f"epoch {epoch} [{a}, {b}) forgotten after the resume"
    assert after.count(0) > before.count(0)


class _Engine:
    def __init__(self, stage: int) -> None:
        self.stage = stage

    def zero_optimization_stage(self) -> int:
        return self.stage


def test_a_world_size_deepspeed_cannot_reshard_is_refused_in_one_line(tmp_path):
    from megafusion.training.run_setup import check_resume_world

    for r in range(2):
        (tmp_path / f"rank{r}.pt").write_bytes(b"")
    check_resume_world(_Engine(0), tmp_path, 1)
    check_resume_world(_Engine(2), tmp_path, 2)
    with pytest.raises(ValueError, match="2 ranks, resuming with 1: DeepSpeed cannot reshard ZeRO stage 2"):
        check_resume_world(_Engine(2), tmp_path, 1)


def _streams(tmp_path, shards, allow_data_change=False) -> DataStreams:
    loaders = [build_loader(_stream(tmp_path, shards, rank=s, world=2, num_workers=0), batch_size=1,
                            allow_data_change=allow_data_change) for s in range(2)]
    return DataStreams([0, 1], loaders, [torch.Generator().manual_seed(s) for s in range(2)])


def test_torch_engine_streams_refuse_changed_data_unless_allowed(tmp_path):
    shards = make_latent_shards(tmp_path / "s", num_shards=4, per_shard=10)
    streams = _streams(tmp_path, shards)
    it = iter(streams)
    for _ in range(4):
        next(it)
    state = streams.state_dict()
    del it
    (shards / "shard-000001.tar").write_bytes(b"")
    with pytest.raises(DataChangedError, match=r"shard-000001\.tar \d+ -> 0 bytes"):
        _streams(tmp_path, shards).load_state_dict(state)
    allowed = _streams(tmp_path, shards, allow_data_change=True)
    allowed.load_state_dict(state)
    assert next(iter(allowed))["keys"]
