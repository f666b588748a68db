"""`megafusion demo --quick`: the whole pipeline (VAE, latents, training, export, evaluation, report) on the
random tiny Llama with a few steps, then a rerun that reuses every finished step."""

import json
import subprocess

import pytest

from tests.distributed import REPO, cpu_env, megafusion_command

pytestmark = pytest.mark.slow


def _demo(out) -> subprocess.CompletedProcess:
    proc = subprocess.run(megafusion_command(["demo", "--quick", "--out", str(out)]), cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_quick_demo_writes_report_and_reuses_finished_steps(tmp_path):
    out = tmp_path / "demo"
    _demo(out)
    for name in ("report.md", "report.json", "loss_curves.png", "eval/generated.png", "eval/captions.png",
                 "eval/generated/prompt_00.png", "eval/generated/prompt_09.png", "eval/eval.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert set(report["targets"]) == {"generation_accuracy_cfg_le_5", "generation_accuracy_cfg_1.55",
                                      "fid_in_domain_over_floor", "fid_in_domain_over_floor_cfg_1.55",
                                      "caption_accuracy", "text_identical_to_base",
                                      "wall_seconds"}
    assert report["targets"]["text_identical_to_base"]["value"] is True  # text frozen: always identical
    ev = report["eval"]
    assert 0.0 <= ev["generation"]["accuracy"] <= 1.0 and ev["generation"]["fid_in_domain"] >= 0
    assert 0.0 <= ev["captioning"]["accuracy"] <= 1.0 and ev["captioning"]["cider"] >= 0
    assert ev["denoising"]["num_images"] == 6 and ev["denoising"]["loss_own_caption"] > 0
    assert ev["denoising"]["conditioning_probe"]["num_images"] == 6
    assert ev["classifier"]["test_accuracy"] > 0.9  # the in-domain judge itself is reliable on real digits
    assert ev["split"] == "test" and set(ev["judges"]) == {"mlp", "hog_svm"}
    assert all(j["test_confident_accuracy"] >= 0.95 for j in ev["judges"].values())
    assert all(0.0 <= j["test_vae_roundtrip_confident_accuracy"] <= 1.0 for j in ev["judges"].values())
    assert set(ev["generation"]["accuracy_by_judge"]) == {"mlp", "hog_svm"}
    assert ev["generation"]["accuracy"] == min(ev["generation"]["accuracy_by_judge"].values())
    oot = ev["generation"]["out_of_template"]
    assert oot["guidance_scale"] == 2.0 and "figure showing" in oot["prompt_phrasing"]
    assert sum(map(sum, ev["generation"]["confusion"]["mlp"])) == ev["generation"]["num_images"]
    assert (out / "eval/confusion.png").is_file() and "eval/confusion.png" in (out / "report.md").read_text()
    assert report["training"]["steps"] == 3
    md = (out / "report.md").read_text()
    assert "| caption swap at t=500:" in md
    assert "![loss curves](loss_curves.png)" in md and "eval/generated.png" in md and "eval/captions.png" in md
    sweep = {p["guidance_scale"]: p for p in ev["generation"]["guidance_sweep"]}
    assert set(sweep) == {1.0, 2.0} and "| CFG scale |" in md and "comes from the **test** split" in md
    assert sweep[2.0]["accuracy_by_judge"] == ev["generation"]["accuracy_by_judge"]

    # A sweep point is what a standalone `megafusion eval` at that scale measures (same prompts and seed).
    alone = subprocess.run(megafusion_command([
        "eval", "--model", str(out / "model"), "--vae", str(out / "vae"), "--dataset", "digits", "--cfg", "1",
        "--images-per-prompt", "2", "--steps", "2", "--caption-images", "4", "--skip-text"]),
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    headline = json.loads(alone.stdout[alone.stdout.index("{"):])
    assert headline["generation_accuracy_by_judge"] == sweep[1.0]["accuracy_by_judge"]
    assert headline["fid_in_domain"] == pytest.approx(sweep[1.0]["fid_in_domain"], rel=1e-6)

    again = _demo(out)
    for step in ("demo VAE", "latents", "training", "export"):
        line = next(ln for ln in again.stdout.splitlines() if ln.startswith("[demo") and step in ln)
        assert "already done, reusing" in line, line
