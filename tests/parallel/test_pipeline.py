"""Pipeline parallel (parallel.pp) composed with tensor parallel and FSDP2 equals one process (fp32, gloo on CPU).

Library level (pipeline_worker.py): 2 AdamW steps of a 4-layer tiny LlamaFusion (frozen text set) through
megafusion.parallel.pipeline against a single-process copy on the same global batch; micro-batches hold 0-4
images and different text-token counts. Engine level (`megafusion train --train.engine=torch --parallel.pp=2`):
losses equal one process, a pp2 checkpoint resumes in one process with the uninterrupted run's next loss, and
`megafusion export` reads it. Few launches: every torchrun costs ~10 s of start-up here."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megafusion.parallel.pipeline_split import even_split, plan_pipeline
from tests.distributed import REPO, cpu_env, megafusion_command, run_distributed, run_worker_launch
from tests.helpers import save_tiny_llama

RTOL = 1e-5
LAUNCHES = {
    # schedule x base: untied GQA (vocab-split embedding / LM head under tp) and tied (a frozen copy per end).
    "pp2": (2, ["2,1,1,1:gpipe:4:{gqa}", "2,1,1,1:1f1b:4:{tied}:noskip", "2,1,1,1:interleaved_1f1b:4:{gqa}:ac"]),
    "pp2_tp2": (4, ["2,1,1,2:1f1b:4:{gqa}"]),
    "pp2_dp2_tp2": (8, ["2,1,2,2:1f1b:2:{tied}"]),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("pp_bases")
    save_tiny_llama(root / "gqa", "gqa-untied", num_hidden_layers=4)
    save_tiny_llama(root / "tied", "mha-tied", num_hidden_layers=4)
    return {"gqa": str(root / "gqa"), "tied": str(root / "tied")}


@pytest.mark.slow
@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_pipeline_training_equals_one_process(launch: str, bases: dict[str, str], tmp_path: Path) -> None:
    processes, cases = LAUNCHES[launch]
    results = run_worker_launch("tests/parallel/pipeline_worker.py", processes, [c.format(**bases) for c in cases],
                                tmp_path / "results.json")
    for r in results:
        summary = json.dumps(r, indent=1)
        print(f"  {r['case']}: loss {r['rel_loss']:.1e}, grad norm {r['rel_grad_norm']:.1e}, weights "
              f"{r['weight_rel']:.1e}, images per micro-batch {r['images_per_microbatch']}, {r['seconds']:.1f} s")
        assert r["rel_loss"] < RTOL and r["rel_grad_norm"] < RTOL, summary
        assert r["weight_rel"] < RTOL, summary
        assert r["losses"][0] != r["losses"][1], summary
        assert r["text_bitwise_unchanged"] and r["every_rank_has_both"], summary
        assert len(set(r["images_per_microbatch"])) > 1, summary


# ------------------------------------------------------------------------------------------ the training engine
TINY = "configs/tiny-cpu.yaml"


def _args(out: Path, *extra: str) -> list[str]:
    return ["train", "--config", TINY, f"--train.output_dir={out}", "--train.max_steps=3", "--train.save_every=2",
            "--train.grad_accum_steps=2", "--train.engine=torch", "--no-progress", *extra]


def _one_process(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(megafusion_command(args), cwd=REPO, env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_pp2_engine_run_equals_one_process_and_resumes_in_one(tmp_path: Path) -> None:
    pp2, one, resumed = tmp_path / "pp2", tmp_path / "one", tmp_path / "resumed"
    start = time.perf_counter()
    run_distributed(["-m", "megafusion", *_args(pp2, "--parallel.pp=2", "--parallel.pp_schedule=gpipe")],
                    world_size=2, timeout=300)
    # The one-process objective computes every row's loss too, so the logged losses are comparable.
    _one_process(_args(one, "--train.skip_frozen_rows=false"))
    a, b = _losses(pp2), _losses(one)
    worst = max(abs(a[s] - b[s]) / abs(b[s]) for s in (1, 2, 3))
    print(f"pp2 engine vs one process: losses {a} vs {b}, worst {worst:.1e}")
    assert worst < RTOL

    # The pp2 run as if stopped right after its step-2 checkpoint, resumed in one process.
    tag = "step-00000002"
    shutil.copytree(pp2 / "checkpoints" / tag, resumed / "checkpoints" / tag)
    (resumed / "checkpoints" / "latest").write_text(tag + "\n")
    _one_process(_args(resumed, "--train.skip_frozen_rows=false"))
    c = _losses(resumed)
    assert sorted(c) == [3] and abs(c[3] - a[3]) / abs(a[3]) < RTOL, (c, a)

    # `megafusion export` of the pipelined run (in this process: the command is this one call).
    from megafusion.model import LlamaFusion
    from megafusion.training.export import export_checkpoint

    export_checkpoint(pp2, tmp_path / "fused")
    exported = LlamaFusion.from_pretrained(tmp_path / "fused").state_dict()
    reader = dcp.FileSystemReader(str(pp2 / "checkpoints" / "step-00000003"))
    saved = [k.removeprefix("model.") for k in reader.read_metadata().state_dict_metadata if k.startswith("model.")]
    # Both stages' trainable weights are in the checkpoint (the U-Net down of stage 0, the U-Net up of stage 1).
    assert any(k.startswith("unet_down.") for k in saved) and any(k.startswith("unet_up.") for k in saved)
    state = {"model": {k: torch.empty_like(exported[k]) for k in saved}}
    dcp.load(state, checkpoint_id=reader.path, no_dist=True)
    for k in saved:
        assert torch.equal(state["model"][k], exported[k]), k
    print(f"engine runs: {time.perf_counter() - start:.1f} s")


# ------------------------------------------------------------------------------------------ validation
def _plan(**overrides):
    kwargs = dict(pp=2, schedule="1f1b", microbatches=0, pp_layers=[], num_layers=4, grad_accum_steps=4,
                  engine="torch")
    kwargs.update(overrides)
    return plan_pipeline(**kwargs)


def test_even_split_and_explicit_layers() -> None:
    assert even_split(4, 2) == [2, 2]
    assert even_split(7, 3) == [2, 3, 2]  # the remainder goes to the middle stages first
    assert _plan().stage_layers == ((0, 1), (2, 3))
    assert _plan(pp_layers=[1, 3]).stage_layers == ((0,), (1, 2, 3))
    assert _plan(schedule="interleaved_1f1b").stage_layers == ((0,), (1,), (2,), (3,))
    assert _plan(pp=1).microbatches == 4


@pytest.mark.parametrize(("overrides", "keys"), [
    ({"pp": 8}, ["parallel.pp (8)"]),
    ({"schedule": "interleaved_1f1b", "num_layers": 3}, ["parallel.pp (2)", "parallel.pp_schedule"]),
    ({"pp_layers": [1, 2]}, ["parallel.pp_layers"]),
    ({"pp_layers": [4]}, ["parallel.pp_layers"]),
    ({"microbatches": 3}, ["parallel.pp_microbatches (3)", "train.grad_accum_steps (4)"]),
    ({"grad_accum_steps": 1}, ["parallel.pp_microbatches (1)", "parallel.pp (2)"]),
    ({"pp": 4, "microbatches": 6, "grad_accum_steps": 6, "schedule": "interleaved_1f1b", "num_layers": 8},
     ["parallel.pp_microbatches (6)", "parallel.pp (4)", "parallel.pp_schedule"]),
    ({"engine": "deepspeed"}, ["parallel.pp (2)", "train.engine"]),
    ({"pp": 1, "pp_layers": [2, 2]}, ["parallel.pp_layers"]),
])
def test_bad_pipeline_settings_name_their_keys(overrides: dict, keys: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        _plan(**overrides)
    for key in keys:
        assert key in str(err.value), str(err.value)


def test_run_config_refusals_before_any_work(tmp_path: Path) -> None:
    from megafusion.config.loader import load_config
    from megafusion.training.torch_engine import validate_torch_run

    def refused(world: int, *overrides: str) -> str:
        cfg = load_config(TINY, [f"--train.output_dir={tmp_path / 'never'}", *overrides])
        with pytest.raises(ValueError) as err:
            validate_torch_run(cfg, world)
        return str(err.value)

    engine = "--train.engine=torch"
    assert "parallel.pp (2) must divide the world size 3" in refused(3, engine, "--parallel.pp=2",
                                                                     "--train.grad_accum_steps=2")
    assert "parallel.pp_layers ([1, 1, 1])" in refused(2, engine, "--parallel.pp=2", "--parallel.pp_layers=[1,1,1]",
                                        "--train.grad_accum_steps=2")
    assert "model.routing" in refused(2, engine, "--parallel.pp=2", "--train.grad_accum_steps=2",
                                      "--model.routing=triton")
    assert "train.engine" in refused(2, "--parallel.pp=2", "--train.grad_accum_steps=2")
    assert not (tmp_path / "never").exists()


def test_plan_includes_pipeline_layouts() -> None:
    from megafusion.config.loader import load_config
    from megafusion.training.plan import build_plan, format_plan

    plan = build_plan(load_config("llama3-70b-paper"), 64, 80.0)
    pipelined = [e for e in plan.estimates if e.layout.name.startswith("torch pp")]
    assert {e.layout.pp for e in pipelined} == {2, 4, 8}
    # Stages split the layers: the heaviest stage holds fewer weights than the whole model at the same tp x dp.
    flat = next(e for e in plan.estimates if e.layout.name == "torch tp8 x fsdp8")
    assert next(e for e in pipelined if e.layout.name == "torch pp8 x tp8").states.frozen < 2 * flat.states.frozen
    assert all("--parallel.pp=" in e.layout.overrides for e in pipelined) and "torch pp" in format_plan(plan)
