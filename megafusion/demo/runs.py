"""Training runs of the demo and the ablation: how far a run got, its export, and runs made stale by a new VAE.

    <run>/trained_on.json         the VAE whose latents the run trains on (drop_if_stale)
    <model>/exported_from.json    the run and step an export was made from (export_ready / export_run)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

EXPORT_MARKER = "exported_from.json"
RUN_MARKER = "trained_on.json"


def trained_step(run_dir: Path) -> int:
    """The step of the run's latest complete checkpoint (0 when there is none)."""
    from megafusion.training.run_checkpoints import CheckpointManager

    tag = CheckpointManager(run_dir / "checkpoints", 1, {}, 0, 1).latest_tag()
    return int(tag.split("-")[-1]) if tag else 0


def export_ready(model_dir: Path, run_dir: Path) -> bool:
    """True if `model_dir` is an export of the run's latest checkpoint."""
    marker = model_dir / EXPORT_MARKER
    if not (marker.is_file() and (model_dir / "fusion_config.json").is_file()):
        return False
    return json.loads(marker.read_text()).get("step") == trained_step(run_dir)


def export_run(run_dir: Path, model_dir: Path) -> Path:
    """Export the run's latest checkpoint to `model_dir` and record which step it is (see export_ready)."""
    from megafusion.training.export import export_checkpoint

    export_checkpoint(run_dir, model_dir)
    (model_dir / EXPORT_MARKER).write_text(json.dumps({"run": str(run_dir), "step": trained_step(run_dir)}) + "\n")
    return model_dir


def drop_if_stale(run_dir: Path, model_dir: Path, vae_dir: Path, progress: bool) -> None:
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
