"""Verified checkpoints: the COMPLETE manifest (size + sha256 of every file), resume from the newest intact
checkpoint, `megafusion checkpoint verify`, and keep_last counting only intact checkpoints.

Unit tests write small fake checkpoints through CheckpointManager's own save steps; the end-to-end tests share one
4-step DeepSpeed run of configs/tiny-cpu.yaml (checkpoints at steps 2 and 4) and damage copies of it."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from megafusion.cli import main
from megafusion.training import checkpoint_manifest as manifest
from megafusion.training.run_checkpoints import CheckpointError, CheckpointManager
from tests.distributed import REPO, cpu_env, free_port, megafusion_command

OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
MODEL = "mp_rank_00_model_states.pt"


def _fake_save(manager: CheckpointManager, step: int) -> Path:
    """A checkpoint written the way a real save finishes (hash every file, manifest, `latest`, prune)."""
    tag, target = manager._begin(step)
    target.mkdir(parents=True)
    (target / "weights.pt").write_bytes(bytes(range(256)) * 40 + step.to_bytes(4, "little"))
    (target / "sub").mkdir()
    (target / "sub" / ".metadata").write_text(f"step {step}\n")
    manager._finish(tag, step)
    return target


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture
def manager(tmp_path) -> CheckpointManager:
    return CheckpointManager(tmp_path / "checkpoints", 3, {}, 0, 1)


def test_manifest_lists_every_file_with_size_and_sha256(manager):
    target = _fake_save(manager, 2)
    marker = json.loads((target / "COMPLETE").read_text())
    assert marker["format"] == manifest.FORMAT and marker["step"] == 2
    assert sorted(marker["files"]) == ["sub/.metadata", "weights.pt"]
    weights = marker["files"]["weights.pt"]
    assert weights["size"] == (target / "weights.pt").stat().st_size
    assert weights["sha256"] == hashlib.sha256((target / "weights.pt").read_bytes()).hexdigest()
    assert manifest.verify(target).state == manifest.INTACT


@pytest.mark.parametrize(("damage", "expected"), [
    (_truncate, r"^weights\.pt: size 5122 bytes, manifest says 10244$"),
    (lambda p: _flip_byte(p, 5000), r"^weights\.pt: sha256 differs from the manifest \(same size"),
    (lambda p: p.unlink(), r"^weights\.pt: missing"),
])
def test_each_kind_of_damage_is_named_in_one_line(manager, damage, expected):
    target = _fake_save(manager, 2)
    damage(target / "weights.pt")
    verdict = manifest.verify(target)
    assert verdict.state == manifest.DAMAGED and not verdict.loadable
    assert "\n" not in verdict.reason
    assert re.search(expected, verdict.reason), verdict.reason


def test_unreadable_marker_is_damage_and_a_legacy_marker_is_unverified(manager):
    target = _fake_save(manager, 2)
    (target / "COMPLETE").write_text('{"format": "megafusion-checkpoint/1", "fi')
    assert manifest.verify(target).describe().startswith("damaged: COMPLETE: unreadable manifest")
    (target / "COMPLETE").write_text("2\n")  # what checkpoints written before manifests hold
    verdict = manifest.verify(target)
    assert verdict.state == manifest.UNVERIFIED and verdict.loadable
    assert manager.resume_tag() == "step-00000002"
    # Unverified and unreadable: one line naming it instead of the loader's traceback.
    with pytest.raises(CheckpointError, match=r"step-00000002: could not be read \(RuntimeError: zip\); it has no"):
        with manager.reading("step-00000002"):
            raise RuntimeError("zip\narchive")


def test_resume_falls_back_to_the_newest_intact_checkpoint(manager, caplog):
    for step in (2, 4, 6):
        _fake_save(manager, step)
    _flip_byte(manager.dir / "step-00000006" / "weights.pt", 10)
    (manager.dir / "step-00000004" / "sub" / ".metadata").unlink()
    with caplog.at_level(logging.WARNING):
        assert CheckpointManager(manager.dir, 3, {}, 0, 1).resume_tag() == "step-00000002"
    lines = [r.getMessage() for r in caplog.records]
    assert any("step-00000006: damaged: weights.pt: sha256 differs" in line for line in lines), lines
    assert any("step-00000004: damaged: sub/.metadata: missing" in line for line in lines), lines
    assert any("step-00000002: intact; resuming from it" in line for line in lines), lines


def test_no_intact_checkpoint_raises_one_line_naming_them(manager):
    for step in (2, 4):
        _truncate(_fake_save(manager, step) / "weights.pt")
    with pytest.raises(CheckpointError) as err:
        CheckpointManager(manager.dir, 3, {}, 0, 1).resume_tag()
    message = str(err.value)
    assert "\n" not in message and "no checkpoint can be resumed" in message
    assert "step-00000004: damaged, step-00000002: damaged" in message
    assert isinstance(err.value, ValueError), "the command line maps ValueError to exit code 2"


def test_keep_last_never_counts_a_damaged_checkpoint(tmp_path):
    """keep_last=2 with the newest damaged: the resume goes back to step 4 and its next save (step 5) must not
    prune step 4, which with the damaged step 6 counted would be the only other intact checkpoint."""
    first = CheckpointManager(tmp_path, 3, {}, 0, 1)
    for step in (2, 4, 6):
        _fake_save(first, step)
    _truncate(tmp_path / "step-00000006" / "weights.pt")
    resumed = CheckpointManager(tmp_path, 2, {}, 0, 1)
    assert resumed.resume_tag() == "step-00000004"
    _fake_save(resumed, 5)
    assert resumed.step_tags() == ["step-00000004", "step-00000005", "step-00000006"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000005"

    # keep_last=1: the just-written checkpoint is the newest intact one and is what stays.
    _fake_save(CheckpointManager(tmp_path, 1, {}, 0, 1), 7)
    assert CheckpointManager(tmp_path, 1, {}, 0, 1).step_tags()[-1] == "step-00000007"
    assert manifest.verify(tmp_path / "step-00000007").state == manifest.INTACT


def test_verify_command_prints_one_line_per_checkpoint_and_exit_codes(manager, capsys):
    run = manager.dir.parent
    for step in (2, 4):
        _fake_save(manager, step)
    (manager.dir / "step-00000006").mkdir()  # a save that never finished
    assert main(["checkpoint", "verify", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("step-00000002: intact: 2 files, 0.0 MB")
    assert out[2].endswith("step-00000006: incomplete: no COMPLETE marker: its save did not finish")
    assert out[-1].endswith("a resume would use " + str(manager.dir / "step-00000004"))

    _flip_byte(manager.dir / "step-00000004" / "weights.pt", 0)
    assert main(["checkpoint", "verify", str(manager.dir)]) == 1  # the checkpoints directory works too
    out = capsys.readouterr().out
    assert "step-00000004: damaged: weights.pt: sha256 differs" in out and out.endswith("step-00000002\n")

    _truncate(manager.dir / "step-00000002" / "weights.pt")
    assert main(["checkpoint", "verify", str(run)]) == 2
    captured = capsys.readouterr()
    assert "no checkpoint can be resumed" in captured.err
    assert main(["checkpoint", "verify", str(run / "nothing")]) == 2


# End to end: one real DeepSpeed run, damaged copies of it.

TINY = "configs/tiny-cpu.yaml"


def _train(out: Path) -> subprocess.CompletedProcess:
    args = ["train", "--config", TINY, f"--train.output_dir={out}", "--train.max_steps=4", "--train.save_every=2",
            "--train.keep_last=3", "--no-progress"]
    return subprocess.run(megafusion_command(args), cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=600)


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verified") / "run"
    proc = _train(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
def test_truncated_newest_checkpoint_resumes_from_the_previous_one(run_copy, trained):
    newest = run_copy / "checkpoints" / "step-00000004"
    _truncate(newest / OPTIM)
    proc = _train(run_copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    damaged = [line for line in proc.stderr.splitlines() if "step-00000004: damaged" in line]
    assert len(damaged) == 1 and f"{OPTIM}: size " in damaged[0] and "manifest says 2" in damaged[0], proc.stderr
    assert "step-00000002: intact; resuming from it, the newest intact checkpoint" in proc.stderr
    assert "step-00000002 at step 2" in proc.stderr
    assert _losses(run_copy) == _losses(trained)  # steps 3-4 redone exactly
    assert manifest.verify(newest).state == manifest.INTACT  # and step 4 saved again


def _tensor_byte(path: Path) -> int:
    """An offset in the middle of the largest tensor storage of a torch.save zip (not in its pickle or headers)."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as fh:  # data starts after the local header (30 bytes + name + extra field)
        fh.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(fh.read(2), "little") for _ in range(2))
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


@pytest.mark.slow
def test_a_flipped_byte_inside_a_tensor_is_caught_by_the_checksum(run_copy, capsys):
    model = run_copy / "checkpoints" / "step-00000004" / MODEL
    size = model.stat().st_size
    _flip_byte(model, _tensor_byte(model))
    assert model.stat().st_size == size
    assert main(["checkpoint", "verify", str(run_copy)]) == 1
    out = capsys.readouterr().out
    assert f"step-00000004: damaged: {MODEL}: sha256 differs from the manifest (same size" in out
    assert "step-00000002: intact" in out and out.endswith("step-00000002\n")


@pytest.mark.slow
def test_no_intact_checkpoint_exits_2_with_one_line_and_no_traceback(run_copy):
    for tag in ("step-00000002", "step-00000004"):
        _truncate(run_copy / "checkpoints" / tag / "rank0.pt")
    proc = _train(run_copy)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megafusion train: error:")]
    assert len(errors) == 1 and "no checkpoint can be resumed" in errors[0], proc.stderr[-3000:]
    assert "--train.resume=false" in errors[0]


# The torch engine's DCP checkpoints: same manifest, and its resume picks the checkpoint (and its data streams)
# before the process group exists. (Its "none intact" path is the DeepSpeed one's: CheckpointError, exit 2.)

def _train_torch(out: Path) -> subprocess.CompletedProcess:
    args = ["train", "--config", TINY, f"--train.output_dir={out}", "--train.max_steps=2", "--train.save_every=1",
            "--train.keep_last=3", "--train.engine=torch", "--no-progress"]
    return subprocess.run(megafusion_command(args), cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def trained_torch(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verified_torch") / "run"
    proc = _train_torch(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_torch_engine_checkpoint_manifest_and_fallback(trained_torch, tmp_path):
    newest = trained_torch / "checkpoints" / "step-00000002"
    files = json.loads((newest / "COMPLETE").read_text())["files"]
    assert sorted(files) == [".metadata", "__0_0.distcp", "client.pt", "stream0.pt"]

    run = tmp_path / "run"
    shutil.copytree(trained_torch, run)
    _truncate(run / "checkpoints" / "step-00000002" / "client.pt")
    proc = _train_torch(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    damaged = [line for line in proc.stderr.splitlines() if "damaged" in line]
    assert len(damaged) == 1 and "step-00000002: damaged: client.pt: size" in damaged[0], proc.stderr[-3000:]
    assert "resumed from " + str(run / "checkpoints" / "step-00000001") in proc.stderr
    assert _losses(run) == _losses(trained_torch)




def _two_rank_worker(rank: int, directory: Path, out: Path, port: int) -> None:
    """Each rank writes its own file into checkpoints 2 and 4; rank 1's file of step 4 is then damaged, and both
    ranks must agree on step 2 (hashing and verification are split across the ranks)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    manager = CheckpointManager(directory, 3, {}, rank, 2)
    for step in (2, 4):
        tag, target = manager._begin(step)
        target.mkdir(parents=True, exist_ok=True)
        (target / f"rank{rank}.bin").write_bytes(bytes([rank, step]) * 5000)
        manager._finish(tag, step)
    files = sorted(json.loads((directory / "step-00000004" / "COMPLETE").read_text())["files"])
    if rank == 1:
        _flip_byte(directory / "step-00000004" / "rank1.bin", 7)
    dist.barrier()
    tags: list = [None, None]
    dist.all_gather_object(tags, CheckpointManager(directory, 3, {}, rank, 2).resume_tag())
    if rank == 0:
        out.write_text(json.dumps({"files": files, "resume": tags}))
    dist.destroy_process_group()


def test_two_ranks_hash_and_verify_in_shares(tmp_path):
    # fork: the children reuse this process's imports (a torchrun launch would import torch three more times).
    torch.multiprocessing.start_processes(_two_rank_worker, args=(tmp_path / "ckpt", tmp_path / "out.json",
                                                                  free_port()), nprocs=2, start_method="fork")
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["files"] == ["rank0.bin", "rank1.bin"]
    assert result["resume"] == ["step-00000002", "step-00000002"]
