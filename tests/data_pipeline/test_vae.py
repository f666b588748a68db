"""The image VAE: a tiny train_vae run writes a directory both load_vae and diffusers load; bad dirs are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from megafusion.cli import main
from megafusion.data_pipeline.vae import load_vae, train_vae, vae_identity

TINY = dict(resolution=16, steps=3, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("vae") / "digits-vae"
    return out, train_vae("demo:digits", out, **TINY)


@pytest.mark.slow
def test_train_vae_writes_a_loadable_sd_vae_layout(tiny_vae):
    out, result = tiny_vae
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    assert result["latent_shape"] == [4, 4, 4]  # 3 blocks -> 4x downsampling
    assert result["recon_mse"] > 0 and result["recon_psnr"] > 0 and result["heldout_images"] == 360

    ours, plain = load_vae(out), AutoencoderKL.from_pretrained(out)
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    assert ours.config.scaling_factor == pytest.approx(result["scaling_factor"])
    assert plain.config.scaling_factor == pytest.approx(result["scaling_factor"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = ours.encode(x).latent_dist.mode()
        assert z.shape == (2, 4, 4, 4)
        assert ours.decode(z).sample.shape == (2, 3, 16, 16)
        assert torch.allclose(plain.encode(x).latent_dist.mode(), z)

    identity = vae_identity(out)
    assert len(identity["weights_sha256"]) == 64 and identity["downsample_factor"] == 4
    assert (identity["latent_channels"], identity["sample_size"]) == (4, 16)
    assert identity["scaling_factor"] == pytest.approx(result["scaling_factor"])
    info = json.loads((out / "train_vae.json").read_text())
    assert info["source"] == "demo:digits" and info["steps"] == 3


@pytest.mark.slow
def test_retraining_replaces_the_directory_and_is_seeded(tiny_vae, tmp_path):
    out, result = tiny_vae
    again = train_vae("demo:digits", tmp_path / "v", **TINY)
    assert again["scaling_factor"] == pytest.approx(result["scaling_factor"])  # same seed, same model
    assert vae_identity(tmp_path / "v")["weights_sha256"] == vae_identity(out)["weights_sha256"]
    train_vae("demo:digits", tmp_path / "v", seed=1, **TINY)  # overwrite an existing VAE dir in place
    assert vae_identity(tmp_path / "v")["weights_sha256"] != vae_identity(out)["weights_sha256"]


def test_folder_source_holds_out_every_20th_image(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(40):
        Image.new("RGB", (20, 24), (6 * i, 100, 255 - 6 * i)).save(images / f"{i:03d}.png")
    result = train_vae(str(images), tmp_path / "v", **{**TINY, "steps": 1})
    assert (result["train_images"], result["heldout_images"]) == (38, 2)


def test_refuses_to_replace_a_non_vae_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        train_vae("demo:digits", tmp_path, **TINY)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_bad_architecture_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="resolution"):
        train_vae("demo:digits", tmp_path / "v", resolution=18, steps=1)


def test_load_vae_errors_name_the_directory(tmp_path):
    missing = tmp_path / "no-such-vae"
    with pytest.raises(FileNotFoundError, match="no-such-vae"):
        load_vae(missing)
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty-dir.*config\.json"):
        load_vae(empty)
    unet = tmp_path / "unet-dir"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match=r"unet-dir.*not an AutoencoderKL"):
        load_vae(unet)
    pickled = tmp_path / "bin-only"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"bin-only.*safetensors"):
        load_vae(pickled)
    broken = tmp_path / "broken-weights"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="broken-weights"):
        load_vae(broken)


def test_load_vae_accepts_a_pipeline_dir(tiny_vae, tmp_path):
    out, _ = tiny_vae
    (tmp_path / "vae").symlink_to(out, target_is_directory=True)
    assert load_vae(tmp_path).config.latent_channels == 4


def test_load_vae_in_another_dtype_stays_frozen(tiny_vae):
    """The one loader serves `generate` too, which runs the VAE in the model's dtype."""
    out, _ = tiny_vae
    vae = load_vae(out, torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_cli_train_vae(tmp_path, capsys):
    args = ["--source", "demo:digits", "--out", str(tmp_path / "v"), "--resolution", "16", "--steps", "2"]
    assert main(["train-vae", *args, "--batch-size", "4", "--latent-channels", "2"]) == 0
    printed = capsys.readouterr().out
    assert "reconstruction MSE" in printed and "PSNR" in printed and "2x4x4" in printed
    assert load_vae(tmp_path / "v").config.latent_channels == 2
    assert main(["train-vae", "--source", "demo:digits", "--out", str(tmp_path / "v"), "--resolution", "18"]) == 2
    assert main(["train-vae", "--source", str(tmp_path / "nothing"), "--out", str(tmp_path / "w")]) == 2
    assert "nothing" in capsys.readouterr().err
