"""The demo's steps: base LM -> demo VAE -> latent shards -> LlamaFusion training -> export -> evaluation -> report.

Every step writes into the output directory and is skipped on a rerun when its result is already there
(VAE directory, shard index, a checkpoint at the last step, the exported model), so an interrupted demo
continues where it stopped (training itself resumes from its last checkpoint)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megafusion.config.schema import MegaFusionConfig

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
EXPORT_MARKER = "exported_from.json"
DEMO_MARKER = "demo.json"
RUN_MARKER = "trained_on.json"


@dataclass
class VaeSettings:
    """The demo VAE (data_pipeline.vae.train_vae's defaults): 32 px -> 4x8x8 latents in about 1.5 min on CPU."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    norm_num_groups: int = 8


# CFG for the demo's headline generation numbers. After ~14k documents the caption moves the predicted noise only
# a little, and strong guidance is what turns that into the asked-for digit: measured on one 400-step demo model,
# accuracy 0.14 / 0.37 / 0.51 / 0.64 / 0.65 at CFG 1 / 5 / 8 / 12 / 16, in-domain FID 216 / 207 / 216 / 229 / 238.
# The report also scores the paper's settings (1 = without CFG, 1.55) and 5, so the trade-off stays visible.
DEMO_GUIDANCE = 12.0
DEMO_EVAL: dict[str, Any] = {"guidance_scale": DEMO_GUIDANCE, "guidance_sweep": (1.0, 1.55, 5.0, DEMO_GUIDANCE)}


@dataclass
class DemoSettings:
    dataset: str = "digits"
    out: Path = Path("outputs/demo")
    # YAML of the LlamaFusion run (default: configs/demo-<dataset>.yaml) and --section.key=value overrides.
    config: Path | None = None
    overrides: list[str] = field(default_factory=list)
    resolution: int = 32
    vae: VaeSettings = field(default_factory=VaeSettings)
    # Passed to megafusion.eval.run.EvalSettings.
    eval: dict[str, Any] = field(default_factory=lambda: dict(DEMO_EVAL))
    progress: bool = True
    # Torch threads; None: see choose_threads.
    threads: int | None = None


# A budget small enough for a test: random tiny Llama, a few VAE and training steps, a handful of images.
QUICK_OVERRIDES = [
    "--model.base=builtin:tiny-llama",
    "--unet.channels=32", "--unet.norm_groups=8", "--unet.time_embed_dim=64",
    "--optim.warmup_steps=1", "--optim.total_steps=3",
    "--data.max_len=64", "--data.shuffle_buffer=16",
    "--train.precision=fp32", "--train.save_every=3",
]
QUICK_VAE = VaeSettings(steps=3, batch_size=8, block_out_channels=(8, 16, 16), norm_num_groups=8)
QUICK_EVAL = {"images_per_prompt": 2, "num_prompts": 3, "num_steps": 2, "num_caption_images": 8,
              "num_denoising_images": 6, "caption_max_new_tokens": 4, "text_max_new_tokens": 4, "num_text_prompts": 1,
              "caption_sheet_size": 6, "guidance_scale": 2.0, "guidance_sweep": (1.0, 2.0)}


def quick_settings(dataset: str, out: Path) -> DemoSettings:
    return DemoSettings(dataset=dataset, out=out, overrides=list(QUICK_OVERRIDES), vae=QUICK_VAE,
                        eval=dict(QUICK_EVAL))


class StepLog:
    """Numbered step headers on stdout (so progress is visible between the tqdm bars) and per-step timings."""

    def __init__(self, total: int, progress: bool) -> None:
        self.total, self.progress, self.k = total, progress, 0
        self.seconds: dict[str, float] = {}
        self.reused: dict[str, bool] = {}

    def run(self, name: str, done: bool, fn: Callable[[], Any], what: str) -> Any:
        self.k += 1
        if self.progress:
            state = "already done, reusing" if done else "running"
            print(f"\n[demo {self.k}/{self.total}] {what} ({state})", flush=True)
        start = time.monotonic()
        result = fn()
        self.seconds[name] = round(time.monotonic() - start, 1)
        self.reused[name] = done
        return result


def demo_config(settings: DemoSettings) -> tuple[MegaFusionConfig, Path]:
    from megafusion.config import load_config

    path = settings.config or REPO_CONFIGS / f"demo-{settings.dataset}.yaml"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: demo config not found (pass --config)")
    out = settings.out.resolve()
    overrides = [f"--data.shards={out / 'shards'}", f"--train.output_dir={out / 'run'}", *settings.overrides]
    return load_config(path, overrides), Path(path)


def _claim_out_dir(out: Path, dataset: str) -> None:
    """One output directory holds one dataset's demo: its reusable steps would silently mix otherwise."""
    marker = out / DEMO_MARKER
    if marker.is_file():
        found = json.loads(marker.read_text()).get("dataset")
        if found != dataset:
            raise ValueError(f"{out}: holds the {found!r} demo; pass another --out for {dataset!r}")
    else:
        marker.write_text(json.dumps({"dataset": dataset}) + "\n")


def _vae_ready(vae_dir: Path, channels: int, resolution: int) -> bool:
    config = vae_dir / "config.json"
    if not (config.is_file() and (vae_dir / "diffusion_pytorch_model.safetensors").is_file()):
        return False
    found = json.loads(config.read_text())
    if found.get("latent_channels") != channels or found.get("sample_size") != resolution:
        raise ValueError(f"{vae_dir}: a VAE with {found.get('latent_channels')} latent channels at "
                         f"{found.get('sample_size')} px is in the way (need {channels} at {resolution} px); "
                         "delete it or use another --out")
    return True


def _shards_ready(shards: Path, vae_dir: Path) -> bool:
    from megafusion.data_pipeline.vae import vae_identity

    index = shards / "index.json"
    if not index.is_file():
        return False
    recorded = json.loads(index.read_text()).get("vae") or {}
    if recorded.get("weights_sha256") != vae_identity(vae_dir)["weights_sha256"]:
        shutil.rmtree(shards)  # made with another VAE: those latents mean nothing to the new one
        return False
    return True


def _trained_step(run_dir: Path) -> int:
    from megafusion.training.checkpointing import CheckpointManager

    tag = CheckpointManager(run_dir / "checkpoints", 1, {}, 0, 1).latest_tag()
    return int(tag.split("-")[-1]) if tag else 0


def _export_ready(model_dir: Path, run_dir: Path) -> bool:
    marker = model_dir / EXPORT_MARKER
    if not (marker.is_file() and (model_dir / "fusion_config.json").is_file()):
        return False
    return json.loads(marker.read_text()).get("step") == _trained_step(run_dir)


def _drop_if_stale(run_dir: Path, model_dir: Path, vae_dir: Path, progress: bool) -> None:
    """A run (and its export) trained on another VAE's latents is useless with this one: remove both, and record
    which VAE the run about to start uses."""
    from megafusion.data_pipeline.vae import vae_identity

    marker = run_dir / RUN_MARKER
    vae_sha = vae_identity(vae_dir)["weights_sha256"]
    if marker.is_file() and json.loads(marker.read_text()).get("vae_sha256") != vae_sha:
        if progress:
            print(f"[demo] {run_dir} was trained on another VAE's latents: training again", flush=True)
        shutil.rmtree(run_dir)
        shutil.rmtree(model_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"vae_sha256": vae_sha}) + "\n")


def _train(cfg: MegaFusionConfig) -> None:
    import logging

    from megafusion.training.trainer import train

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train(cfg, progress=True)


def _export(run_dir: Path, model_dir: Path) -> None:
    from megafusion.training.export import export_checkpoint

    export_checkpoint(run_dir, model_dir)
    (model_dir / EXPORT_MARKER).write_text(json.dumps({"run": str(run_dir), "step": _trained_step(run_dir)}) + "\n")


def _busy_cores(seconds: float = 1.0) -> float:
    """Cores other processes kept busy over the last `seconds` (from /proc/stat; 0 where that is unavailable).
    Sampled now rather than read from the load average, which still counts work that ended a minute ago."""

    def snapshot() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total and idle + iowait jiffies

    try:
        total0, idle0 = snapshot()
        time.sleep(seconds)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return 0.0
    cores = os.cpu_count() or 1
    return cores * (1.0 - (idle1 - idle0) / max(1, total1 - total0))


def choose_threads(requested: int | None = None) -> int:
    """Torch threads for the demo: `requested`, else $OMP_NUM_THREADS, else the cores that are idle right now.

    On a 2-core machine already running other work, two OpenMP threads per process spin against each other:
    a 256-token training step measured 9-19 s with 2 threads against 1.7 s with 1 (1.1 s with 2 on an idle
    machine), so the demo only takes the cores nobody else is using when it starts."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, round(cores - _busy_cores())))


def run_demo(settings: DemoSettings) -> dict:
    """Runs every step that is not done yet and writes the report; returns report.json's content."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed: no GPU probing
    import torch

    threads = choose_threads(settings.threads)
    torch.set_num_threads(threads)
    if settings.progress:
        print(f"[demo] {threads} torch thread(s) (1-minute load average {os.getloadavg()[0]:.1f}; --threads to set)",
              flush=True)
    from megafusion.checkpoint.builtin_bases import resolve_base
    from megafusion.data_pipeline.latent_shards import precompute_latents
    from megafusion.data_pipeline.vae import train_vae
    from megafusion.demo.report import write_report
    from megafusion.eval.run import EvalSettings, evaluate

    start = time.monotonic()
    load_at_start = round(os.getloadavg()[0], 2)
    out = settings.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    _claim_out_dir(out, settings.dataset)
    cfg, config_path = demo_config(settings)
    source = f"demo:{settings.dataset}"
    vae_dir, shards, run_dir, model_dir = out / "vae", out / "shards", out / "run", out / "model"
    max_steps = cfg.train.max_steps or cfg.optim.total_steps
    steps = StepLog(6, settings.progress)

    base = steps.run("base", False, lambda: resolve_base(cfg.model.base), f"base LM {cfg.model.base}")
    vae_info = steps.run(
        "vae", _vae_ready(vae_dir, cfg.image.latent_channels, settings.resolution),
        lambda: _vae_ready(vae_dir, cfg.image.latent_channels, settings.resolution) or train_vae(
            source, vae_dir, settings.resolution, cfg.image.latent_channels, settings.vae.steps,
            settings.vae.batch_size, settings.vae.lr, progress=settings.progress,
            block_out_channels=settings.vae.block_out_channels, norm_num_groups=settings.vae.norm_num_groups),
        f"{settings.dataset} dataset + demo VAE -> {vae_dir}",
    )
    steps.run(
        "latents", _shards_ready(shards, vae_dir),
        lambda: _shards_ready(shards, vae_dir) or precompute_latents(
            vae_dir, source, shards, resolution=settings.resolution, batch_size=128, shard_size=256,
            progress=settings.progress),
        f"VAE latents of the train split -> {shards}",
    )
    _drop_if_stale(run_dir, model_dir, vae_dir, settings.progress)
    trained = _trained_step(run_dir) >= max_steps
    steps.run("train", trained, lambda: trained or _train(cfg),
              f"LlamaFusion training ({cfg.model.separation} separation, lr_text={cfg.optim.lr_text}, "
              f"{max_steps} steps) -> {run_dir}")
    steps.run("export", _export_ready(model_dir, run_dir),
              lambda: _export_ready(model_dir, run_dir) or _export(run_dir, model_dir),
              f"export -> {model_dir}")
    eval_settings = EvalSettings(progress=settings.progress, **settings.eval)
    results = steps.run("eval", False, lambda: evaluate(model_dir, vae_dir, settings.dataset, out / "eval",
                                                        eval_settings), "evaluation")
    vae_train = json.loads((vae_dir / "train_vae.json").read_text()) if (vae_dir / "train_vae.json").is_file() \
        else (vae_info if isinstance(vae_info, dict) else {})
    context = {
        "dataset": settings.dataset,
        "out": str(out),
        "base": str(base),
        "config_file": str(config_path),
        "overrides": settings.overrides,
        "vae_settings": asdict(settings.vae),
        "vae_training": {k: v for k, v in vae_train.items() if k != "skipped"},
        "torch_threads": threads,
        "load_average_at_start": load_at_start,
        "steps_seconds": steps.seconds,
        "steps_reused": steps.reused,
        "wall_seconds": round(time.monotonic() - start, 1),
    }
    return write_report(out, cfg, context, results, run_dir / "metrics.jsonl")
