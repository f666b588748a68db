"""The demo's bookkeeping: one dataset per output dir, stale runs dropped when the VAE changes, thread choice,
metrics read back as one record per step."""

import json

import pytest

from megafusion.demo.data_prep import claim_out_dir, drop_if_other_split
from megafusion.demo.pipeline import choose_threads
from megafusion.demo.report import read_metrics
from megafusion.demo.runs import RUN_MARKER, drop_if_stale


def _fake_vae(path, weights: bytes):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4}))
    (path / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    return path


def test_output_dir_holds_one_dataset(tmp_path):
    claim_out_dir(tmp_path, "digits")
    claim_out_dir(tmp_path, "digits")
    with pytest.raises(ValueError, match="holds the 'digits' demo"):
        claim_out_dir(tmp_path, "shapes")


def test_vae_and_shards_of_another_train_split_are_dropped(tmp_path):
    claim_out_dir(tmp_path, "digits")  # a directory from before the val split: no record of its train split
    (tmp_path / "vae").mkdir()
    (tmp_path / "shards").mkdir()
    drop_if_other_split(tmp_path, "digits", progress=False)
    assert not (tmp_path / "vae").exists() and not (tmp_path / "shards").exists()
    assert json.loads((tmp_path / "demo.json").read_text())["dataset"] == "digits"
    (tmp_path / "vae").mkdir()
    drop_if_other_split(tmp_path, "digits", progress=False)  # same split now: kept
    assert (tmp_path / "vae").is_dir()


def test_run_trained_on_another_vae_is_dropped(tmp_path):
    vae, run, model = _fake_vae(tmp_path / "vae", b"one"), tmp_path / "run", tmp_path / "model"
    drop_if_stale(run, model, vae, progress=False)
    (run / "metrics.jsonl").write_text("{}\n")
    model.mkdir()
    drop_if_stale(run, model, vae, progress=False)  # same VAE: kept
    assert (run / "metrics.jsonl").is_file() and model.is_dir()
    _fake_vae(vae, b"two")
    drop_if_stale(run, model, vae, progress=False)
    assert not (run / "metrics.jsonl").exists() and not model.exists()
    assert (run / RUN_MARKER).is_file()


def test_thread_choice(monkeypatch):
    assert choose_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("megafusion.demo.pipeline._busy_cores", lambda: 99.0)
    assert choose_threads() == 1  # never fewer than one


def test_metrics_keep_the_last_record_of_each_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [r["loss"] for r in read_metrics(path)] == [3.0, 1.5, 1.0]
    assert read_metrics(tmp_path / "missing.jsonl") == []
