"""`train.engine: torch` (tensor parallel x FSDP2, DCP checkpoints) on configs/tiny-cpu.yaml, gloo on CPU, fp32.

References are DeepSpeed runs with the same global batch: a torch run with data-parallel degree D draws D data
streams, stream s being what DeepSpeed's rank s of D draws (loader shard s of D, noise generator seed + s). So tp2
(D = 1) is compared with one DeepSpeed process (ZeRO 0), dp2 x tp2 (D = 2) with two DeepSpeed processes (ZeRO 2).
Resuming a dp2 x tp2 checkpoint at tp2 or in one process keeps its 2 streams (2 micro-batches per step on the one
data-parallel rank), so the resumed steps must equal the uninterrupted run's: step 5's loss checks the resharded
weights, step 6's the resharded AdamW moments (they made step 5's update)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megafusion.config import load_config
from megafusion.model import LlamaFusion
from megafusion.training.run_setup import prepare_run
from tests.distributed import REPO, cpu_env, free_port, megafusion_command, run_distributed
from tests.helpers import deepspeed_average

pytestmark = pytest.mark.slow

TINY = "configs/tiny-cpu.yaml"
STEPS, SAVE_AT = 6, 4
RTOL = 1e-5  # fp32 reordering noise (tp all-reduces, FSDP reduce-scatters) measured < 1e-6 on these losses
TIMES: dict[str, float] = {}


def _args(out: Path, *extra: str) -> list[str]:
    # With a weight average: it is sharded like the weights and must match DeepSpeed's too.
    return ["--config", TINY, f"--train.output_dir={out}", f"--train.max_steps={STEPS}",
            f"--train.save_every={SAVE_AT}", "--train.keep_last=3", "--train.ema_decay=0.9", *extra]


def _dcp_state(run: Path, key: str = "ema", step: int = STEPS) -> dict[str, torch.Tensor]:
    """A torch-engine checkpoint's full weights ("model") or weight average ("ema"), read in this process."""
    from megafusion.training.export import dcp_trainable_state

    cfg = load_config(TINY)
    model = LlamaFusion.from_llama(prepare_run(cfg).base, cfg.model.separation, cfg.image, cfg.unet)
    return dcp_trainable_state(run / "checkpoints" / f"step-{step:08d}", model, key)


def _assert_averages_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == ref.keys()
    for name, value in ref.items():
        # atol: the engines' last weights themselves differ by up to 3e-6 (fp32 reordering in the U-Net convs).
        torch.testing.assert_close(ours[name], value, rtol=RTOL, atol=1e-5, msg=name)


def _timed(name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    TIMES[name] = time.perf_counter() - start
    print(f"{name}: {TIMES[name]:.1f} s")
    return result


def _run_cli(args: list[str], world: int = 1) -> subprocess.CompletedProcess:
    if world > 1:
        return run_distributed(["-m", "megafusion", *args], world_size=world, timeout=300)
    proc = subprocess.run(megafusion_command(args), cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}  # a resumed run re-logs: the last record of a step wins


def _assert_losses_close(ours: dict[int, float], ref: dict[int, float], steps) -> float:
    worst = max(abs(ours[s] - ref[s]) / abs(ref[s]) for s in steps)
    assert worst < RTOL, (ours, ref)
    return worst


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("torch_engine")
    r = {name: root / name for name in ("ds1", "ds2", "tp2", "dp2tp2")}
    _timed("deepspeed 1 process", _run_cli, ["train", *_args(r["ds1"], "--train.zero_stage=0", "--no-progress")])
    _timed("deepspeed 2 processes", _run_cli, ["train", *_args(r["ds2"], "--no-progress")], world=2)
    _timed("torch tp2 (worker)", run_distributed,
           ["tests/training/torch_engine_worker.py", f"--out={root / 'tp2.json'}",
            *_args(r["tp2"], "--train.engine=torch", "--parallel.tp=2")], world_size=2, timeout=300)
    _timed("torch dp2 x tp2", _run_cli, ["train", *_args(r["dp2tp2"], "--train.engine=torch", "--parallel.tp=2",
                                                         "--parallel.dp_shard=2", "--no-progress")], world=4)
    r["tp2_result"] = root / "tp2.json"
    return r


def test_tp2_equals_one_deepspeed_process_and_keeps_text_weights(runs):
    worst = _assert_losses_close(_losses(runs["tp2"]), _losses(runs["ds1"]), range(1, STEPS + 1))
    print(f"tp2 vs DeepSpeed 1 process: worst relative loss difference {worst:.1e}")
    result = json.loads(runs["tp2_result"].read_text())
    assert result["text_bitwise_unchanged"] and result["frozen"] > 0 and result["frozen_text_only"], result


def test_dp2_tp2_equals_two_deepspeed_processes(runs):
    worst = _assert_losses_close(_losses(runs["dp2tp2"]), _losses(runs["ds2"]), range(1, STEPS + 1))
    print(f"dp2 x tp2 vs DeepSpeed 2 processes: worst relative loss difference {worst:.1e}")


def test_checkpoints_hold_no_text_parameter(runs):
    for run in ("tp2", "dp2tp2"):
        ckpt = runs[run] / "checkpoints" / f"step-{SAVE_AT:08d}"
        keys = list(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
        weights = [k.removeprefix("model.") for k in keys if k.startswith("model.")]
        moments = [k.removeprefix("optim.state.").rsplit(".", 1)[0] for k in keys if k.startswith("optim.state.")]
        assert weights and moments, keys[:5]
        assert all(LlamaFusion.parameter_group(n) == "image" for n in weights + moments)
        assert set(moments) == set(weights)  # AdamW state for exactly the trainable weights


@pytest.mark.parametrize("world", [2, 1], ids=["tp2", "one_process"])
def test_dp2_tp2_checkpoint_resumes_on_another_layout(runs, tmp_path, world):
    # The dp2 x tp2 run as if stopped right after its step-4 checkpoint.
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints").mkdir(parents=True)
    tag = f"step-{SAVE_AT:08d}"
    shutil.copytree(runs["dp2tp2"] / "checkpoints" / tag, stopped / "checkpoints" / tag)
    (stopped / "checkpoints" / "latest").write_text(tag + "\n")
    layout = ["--parallel.tp=2"] if world == 2 else []
    proc = _timed(f"resume at world {world}", _run_cli,
                  ["train", *_args(stopped, "--train.engine=torch", "--no-progress", *layout)], world=world)
    assert "2 data streams (2 per data-parallel rank, 2 micro-batches per optimizer step)" in proc.stderr
    resumed, uninterrupted = _losses(stopped), _losses(runs["dp2tp2"])
    assert sorted(resumed) == list(range(SAVE_AT + 1, STEPS + 1))
    worst = _assert_losses_close(resumed, uninterrupted, range(SAVE_AT + 1, STEPS + 1))
    print(f"resume at world {world}: steps 5-6 vs uninterrupted dp2 x tp2: worst relative difference {worst:.1e}")
    _assert_averages_close(_dcp_state(stopped), _dcp_state(runs["dp2tp2"]))


def test_weight_average_equals_deepspeeds_and_is_what_export_writes(runs, tmp_path):
    for torch_run, deepspeed_run in (("tp2", "ds1"), ("dp2tp2", "ds2")):
        _assert_averages_close(_dcp_state(runs[torch_run]), deepspeed_average(runs[deepspeed_run], STEPS))
    _run_cli(["export", "--run", str(runs["dp2tp2"]), "--out", str(tmp_path / "averaged")])
    params = dict(LlamaFusion.from_pretrained(tmp_path / "averaged").named_parameters())
    average = deepspeed_average(runs["ds2"], STEPS)
    _assert_averages_close({n: params[n].detach() for n in average}, average)
    raw = _dcp_state(runs["dp2tp2"], "model")
    assert any(not torch.allclose(average[n], raw[n]) for n in average), "the average equals the last weights"


def test_export_of_a_torch_checkpoint_gives_the_trained_model(runs, tmp_path):
    from tests.training.torch_engine_worker import fixed_batch, outputs

    _timed("export", _run_cli, ["export", "--run", str(runs["tp2"]), "--out", str(tmp_path / "fused"),
                                "--raw-weights"])
    model = LlamaFusion.from_pretrained(tmp_path / "fused")
    trained = torch.load(str(runs["tp2_result"]) + ".pt", weights_only=True)
    exported = outputs(model, fixed_batch(model))
    for key, value in trained.items():
        torch.testing.assert_close(exported[key], value, rtol=RTOL, atol=1e-6, msg=key)


def test_bad_layout_is_refused_before_any_work(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run(megafusion_command(["train", *_args(out, "--train.engine=torch", "--parallel.tp=3")]),
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "parallel.tp (3)" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_resume_on_a_data_parallel_degree_not_dividing_the_streams_is_refused(runs, tmp_path):
    # tp2's checkpoint has 1 data stream: 2 data-parallel ranks cannot continue it.
    run = tmp_path / "run"
    shutil.copytree(runs["tp2"] / "checkpoints", run / "checkpoints")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m",
           "megafusion", "train", *_args(run, "--train.engine=torch", "--parallel.dp_shard=2", "--no-progress")]
    proc = subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "1 data streams" in proc.stderr and "parallel.dp_shard" in proc.stderr, proc.stderr[-3000:]
