"""The DeepSpeed training engine: ZeRO equivalence, exact resume after SIGKILL, crash-safe checkpoints, guards.
Every run uses configs/tiny-cpu.yaml (built-in random tiny Llama on the built-in 8x8 digits)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megafusion.config import load_config
from megafusion.model import LlamaFusion
from megafusion.training.run_checkpoints import CheckpointManager
from megafusion.training.run_setup import prepare_run
from tests.distributed import REPO, cpu_env, megafusion_command, run_distributed
from tests.helpers import deepspeed_average

pytestmark = pytest.mark.slow

TINY = "configs/tiny-cpu.yaml"


def _train_args(out: Path, *extra: str) -> list[str]:
    # With a weight average, so every resume below also checks that the average continues exactly.
    return ["train", "--config", TINY, f"--train.output_dir={out}", "--train.max_steps=12", "--train.save_every=4",
            "--train.keep_last=3", "--train.ema_decay=0.9", "--no-progress", *extra]


def _run(args: list[str], script: str | None = None, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, script, *args] if script else megafusion_command(args)
    return subprocess.run(cmd, cwd=REPO, env=cpu_env(**env), capture_output=True, text=True, timeout=600)


def _losses(out: Path) -> dict[int, float]:
    """Loss per step; a resumed run re-logs the steps after its checkpoint, the last record of a step wins."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def _uninterrupted_dir(tmp_path_factory) -> Path:
    return next(p for p in tmp_path_factory.getbasetemp().iterdir() if p.name.startswith("uninterrupted"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = _run(_train_args(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 13))
    return losses


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_two_processes_match_one_process(tmp_path, zero):
    """Same global batch (2 sequences per step): 1 process x 2 accumulation steps vs 2 processes x 1."""
    results = {}
    for world, stage in ((1, 0), (2, zero)):
        out = tmp_path / f"w{world}.json"
        run_distributed(["tests/training/zero_equivalence_worker.py", f"--zero={stage}", f"--out={out}",
                         f"--workdir={tmp_path / f'run{world}'}"], world_size=world)
        results[world] = json.loads(out.read_text())
    torch.testing.assert_close(torch.tensor(results[2]["losses"]), torch.tensor(results[1]["losses"]),
                               rtol=1e-5, atol=1e-6)
    assert results[1]["losses"][0] != results[1]["losses"][-1], "the model did not train"
    # ZeRO-0 in fp32 keeps the norm DeepSpeed's clip computes; the ZeRO optimizer computes its own.
    assert None not in results[1]["grad_norms"] and None not in results[2]["grad_norms"]
    torch.testing.assert_close(torch.tensor(results[2]["grad_norms"]), torch.tensor(results[1]["grad_norms"]),
                               rtol=1e-4, atol=0)
    assert results[1]["text_unchanged"] and results[2]["text_unchanged"]


def test_sigkill_then_resume_equals_uninterrupted_bitwise(tmp_path, uninterrupted, tmp_path_factory):
    out = tmp_path / "killed"
    proc = subprocess.Popen(megafusion_command(_train_args(out)), cwd=REPO, env=cpu_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    metrics = out / "metrics.jsonl"
    # Kill after the step-4 checkpoint exists and a few more steps ran past it.
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert CheckpointManager(out / "checkpoints", 3, {}, 0, 1).latest_tag() is not None

    resumed = _run(_train_args(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert _losses(out) == uninterrupted  # bitwise: fp32 on CPU, same data, RNG and optimizer state
    reference = deepspeed_average(_uninterrupted_dir(tmp_path_factory), 12)
    resumed_average = deepspeed_average(out, 12)
    assert resumed_average.keys() == reference.keys()
    assert all(torch.equal(resumed_average[k], reference[k]) for k in reference), "the weight average diverged"


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, uninterrupted):
    out = tmp_path / "crashed"
    proc = _run(_train_args(out), script="tests/training/crash_during_checkpoint.py", MEGAFUSION_TEST_CRASH_STEP="8")
    assert proc.returncode == 17, proc.stderr[-3000:]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step-00000004"
    assert (ckpt / "step-00000008").is_dir() and not (ckpt / "step-00000008" / "COMPLETE").exists()
    assert CheckpointManager(ckpt, 3, {}, 0, 1).latest_tag() == "step-00000004"

    resumed = _run(_train_args(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-00000004 at step 4" in resumed.stderr
    assert _losses(out) == uninterrupted
    # keep_last=3 complete checkpoints; the half-written one was replaced by a complete save of step 8.
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step-00000004", "step-00000008",
                                                                      "step-00000012"]


def test_text_parameters_bitwise_unchanged_and_image_set_trained(uninterrupted, tmp_path_factory):
    # The module-scoped run above trained with lr_text = 0; its checkpoints hold only trainable parameters.
    out = _uninterrupted_dir(tmp_path_factory)
    states = torch.load(out / "checkpoints" / "step-00000012" / "mp_rank_00_model_states.pt", weights_only=True)
    saved = states["module"]
    assert saved and all(LlamaFusion.parameter_group(k.removeprefix("model.")) == "image" for k in saved)


def test_single_nonfinite_loss_is_skipped_and_counted(tmp_path):
    out = tmp_path / "nan"
    proc = _run(_train_args(out, "--train.max_steps=4"), script="tests/training/nan_loss_train.py",
                MEGAFUSION_TEST_NAN_CALLS="2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["nonfinite_skipped"] == 1 and all(r["loss"] == r["loss"] for r in records)
    assert "non-finite loss at step 3" in proc.stderr


def test_nonfinite_losses_in_a_row_stop_the_run(tmp_path):
    proc = _run(_train_args(tmp_path / "nan", "--train.max_nonfinite_in_a_row=3"),
                script="tests/training/nan_loss_train.py", MEGAFUSION_TEST_NAN_CALLS="all")
    assert proc.returncode != 0
    assert "3 non-finite losses in a row at step 1" in proc.stderr


def test_bad_config_stops_before_any_work(tmp_path):
    out = tmp_path / "never"
    proc = _run(["train", "--config", TINY, f"--train.output_dir={out}", "--train.zero_stag=2"])
    assert proc.returncode == 2 and "unknown key 'train.zero_stag'" in proc.stderr
    proc = _run(["train", "--config", TINY, f"--train.output_dir={out}", "--train.precision=fp8"])
    assert proc.returncode == 2 and "key 'train.precision'" in proc.stderr
    assert not out.exists()


def test_latent_shape_mismatch_is_caught_before_the_model_is_built():
    cfg = load_config(TINY, ["--image.latent_channels=4"])
    with pytest.raises(ValueError, match=r"index.json: latents are \[1, 8, 8\].*\[4, 8, 8\]"):
        prepare_run(cfg)


def test_export_consolidates_checkpoint_and_base(uninterrupted, tmp_path_factory, tmp_path):
    run = _uninterrupted_dir(tmp_path_factory)
    saved = torch.load(run / "checkpoints" / "step-00000012" / "mp_rank_00_model_states.pt", weights_only=True)
    raw = {k.removeprefix("model."): v.float() for k, v in saved["module"].items()}
    average = deepspeed_average(run, 12)
    assert average.keys() == raw.keys()
    assert any(not torch.equal(average[k], raw[k]) for k in raw), "the average equals the last step's weights"
    base = LlamaFusion.from_llama(prepare_run(load_config(TINY)).base)
    base_params = dict(base.named_parameters())
    # Default: the run kept a weight average, so that is what is exported; --raw-weights: the last step's.
    for flags, expected in (([], average), (["--raw-weights"], raw)):
        out = tmp_path / ("fused" + "".join(flags))
        proc = _run(["export", "--run", str(run), "--out", str(out), *flags])
        assert proc.returncode == 0, proc.stderr[-3000:]
        model = LlamaFusion.from_pretrained(out)
        params = dict(model.named_parameters())
        for name, value in expected.items():
            assert torch.equal(params[name], value), (flags, name)
        for name, _ in model.grouped_parameters()["text"]:
            assert torch.equal(params[name], base_params[name]), name


def test_first_metrics_record_carries_the_precision_choice_and_step_2_is_profiled(tmp_path):
    out = tmp_path / "auto"
    proc = _run(_train_args(out, "--train.max_steps=2", "--train.precision=auto", "--train.profile_step=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = records[0]["precision"]
    assert first["requested"] == "auto" and first["precision"] in ("fp32", "bf16")
    assert first["fp32_gflops"] > 0 and first["bf16_gflops"] > 0 and first["cpu"]["model"]
    # bf16 only when the probe measured it clearly faster.
    assert (first["precision"] == "bf16") == (first["bf16_gflops"] >= 1.2 * first["fp32_gflops"])
    assert "precision" not in records[1]
    table = (out / "profile" / "step-2-rank-0.txt").read_text()
    assert "aten::mm" in table and "Self CPU" in table
    assert json.loads((out / "profile" / "step-2-rank-0.json").read_text())["traceEvents"]


def test_damaged_shards_are_counted_in_the_metrics(tmp_path):
    """Every shard cut to a third: training goes on with the readable samples and metrics.jsonl counts the rest."""
    import shutil

    from megafusion.checkpoint.fetch_base import default_cache_dir
    from megafusion.data_pipeline.shard_specs import resolve_shards

    shards = tmp_path / "shards"
    shutil.copytree(resolve_shards("builtin:digits-pixels", default_cache_dir()), shards)
    for tar in shards.glob("shard-*.tar"):
        data = tar.read_bytes()
        tar.write_bytes(data[: len(data) // 3])
    out = tmp_path / "damaged"
    proc = _run(_train_args(out, "--train.max_steps=6", f"--data.shards={shards}", "--data.shuffle_buffer=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    # A shard cut to a third of its bytes loses at least half its samples (the last shard is the smallest).
    smallest = min(json.loads((shards / "index.json").read_text())["counts"])
    assert last["shards_damaged"] >= 1 and last["samples_skipped"] >= smallest // 2 * last["shards_damaged"]
    assert [r["samples_skipped"] for r in records] == sorted(r["samples_skipped"] for r in records)


def test_resume_refuses_a_checkpoint_that_carries_a_pickled_callable(tmp_path):
    """DeepSpeed's own loader unpickles with weights_only=False; ours must refuse, name the file, run nothing."""
    import os

    out = tmp_path / "run"
    proc = _run(_train_args(out, "--train.max_steps=2", "--train.save_every=2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (optim,) = (out / "checkpoints").glob("step-*/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({"optimizer_state_dict": Payload()}, optim)
    # Whoever can plant a file can rewrite the manifest too: checksums catch damage, the safe loader catches code.
    from megafusion.training import checkpoint_manifest as manifest

    ckpt = optim.parent
    manifest.write_manifest(ckpt, 2, manifest.file_records(ckpt, manifest.checkpoint_files(ckpt)))
    proc = _run(_train_args(out, "--train.max_steps=4"))
    assert proc.returncode != 0
    assert "refused to load" in proc.stderr and optim.name in proc.stderr and "posix.system" in proc.stderr
    assert not marker.exists(), "the pickled callable ran"


def test_preemption_signal_saves_exits_for_requeue_and_the_rerun_continues_bitwise(tmp_path, uninterrupted,
                                                                                   tmp_path_factory):
    """SIGUSR1 is what `#SBATCH --signal=USR1@120` sends; SIGTERM takes the same path (test_preemption.py)."""
    sig = signal.SIGUSR1
    from megafusion.training.preemption import PREEMPTED_EXIT_CODE

    out = tmp_path / "preempted"
    proc = subprocess.Popen(megafusion_command(_train_args(out)), cwd=REPO, env=cpu_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    # Signal between the periodic checkpoints (every 4 steps), so only the preemption checkpoint can hold it.
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be signalled"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    tag = CheckpointManager(out / "checkpoints", 3, {}, 0, 1).latest_tag()
    stopped = int(tag.split("-")[-1])
    assert 5 <= stopped < 12 and f"checkpoint of step {stopped} saved" in stderr
    resumed = _run(_train_args(out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 13))
    assert all(losses[s] == uninterrupted[s] for s in range(stopped + 1, 13)), "resumed run diverged"
    reference = deepspeed_average(_uninterrupted_dir(tmp_path_factory), 12)
    resumed_average = deepspeed_average(out, 12)
    assert all(torch.equal(resumed_average[k], reference[k]) for k in reference), "the weight average diverged"
