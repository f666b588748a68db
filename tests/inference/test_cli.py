"""`megafusion generate ...` end to end on the tiny model, tokenizer and VAE."""

from PIL import Image

from megafusion.cli import main
from megafusion.inference.images import load_latents
from megafusion.model import LlamaFusion
from megafusion.model.args import DiffusionArgs


def test_generate_text_from_fused_model_and_from_base(tiny_dirs, capsys):
    args = ["--prompt", "w3 w4", "--prompt", "w5", "--max-new-tokens", "4"]
    assert main(["generate", "text", "--model", str(tiny_dirs["fused"]), *args]) == 0
    fused = capsys.readouterr().out.splitlines()
    assert main(["generate", "text", "--base", str(tiny_dirs["base"]), *args]) == 0
    assert capsys.readouterr().out.splitlines() == fused and len(fused) == 2


def test_generate_image_caption_edit_interleave(tiny_dirs, tmp_path, capsys):
    model, vae = str(tiny_dirs["fused"]), str(tiny_dirs["vae"])
    out = tmp_path / "img"
    common = ["--steps", "2", "--seed", "0", "--vae", vae]
    assert main(["generate", "image", "--model", model, "--prompt", "w3", "--prompt", "w4 w5", "--num-images", "2",
                 "--out", str(out), *common]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 5 and (out / "image_grid.png").is_file()
    png = Image.open(out / "image_003.png")
    assert png.size == (8, 8)
    latents = load_latents(out / "image_latents.safetensors")
    assert latents.shape == (4, 4, 4, 4)

    assert main(["generate", "caption", "--model", model, "--latents", str(out / "image_latents.safetensors"),
                 "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    assert main(["generate", "caption", "--model", model, "--image", str(out / "image_000.png"), "--vae", vae]) == 0
    capsys.readouterr()

    assert main(["generate", "edit", "--model", model, "--image", str(out / "image_000.png"), "--instruction",
                 "w9 w10", "--sampler", "ddpm", "--out", str(tmp_path / "edit"), *common]) == 0
    assert (tmp_path / "edit" / "edit_000.png").is_file()
    capsys.readouterr()

    assert main(["generate", "interleave", "--model", model, "--prompt", "w3", "--max-new-tokens", "3",
                 "--out", str(tmp_path / "mixed"), "--no-cfg", *common]) == 0
    capsys.readouterr()


def test_generate_reports_bad_input(tiny_dirs, capsys):
    code = main(["generate", "caption", "--model", str(tiny_dirs["fused"]), "--image", "x.png"])
    assert code == 2 and "needs --vae" in capsys.readouterr().err


def _fused_with(tiny_dirs, out, **attrs):
    """The tiny fused model saved again with other recorded training settings."""
    model = LlamaFusion.from_pretrained(tiny_dirs["fused"])
    for name, value in attrs.items():
        setattr(model, name, value)
    model.save_pretrained(out)
    return str(out)


def test_generate_reads_the_models_diffusion_settings_and_rejects_contradictions(tiny_dirs, tmp_path, capsys):
    model = _fused_with(tiny_dirs, tmp_path / "m500", diffusion_args=DiffusionArgs(500, "linear"))
    agreeing = tmp_path / "agree.yaml"
    agreeing.write_text("diffusion:\n  num_train_timesteps: 500\n  beta_schedule: linear\n"
                        "  image_first_max_timestep: 250\n")
    common = ["--model", model, "--prompt", "w3", "--steps", "2", "--seed", "0", "--no-cfg"]
    assert main(["generate", "image", *common, "--out", str(tmp_path / "a"), "--num-train-timesteps", "500",
                 "--config", str(agreeing)]) == 0
    capsys.readouterr()

    assert main(["generate", "image", *common, "--out", str(tmp_path / "b"), "--num-train-timesteps", "1000"]) == 2
    err = capsys.readouterr().err
    assert "--num-train-timesteps 1000" in err and "num_train_timesteps 500" in err

    contradicting = tmp_path / "cosine.yaml"
    # beta_schedule: the cosine default
    contradicting.write_text("diffusion:\n  num_train_timesteps: 500\n  image_first_max_timestep: 250\n")
    assert main(["generate", "interleave", *common, "--out", str(tmp_path / "c"), "--config", str(contradicting)]) == 2
    err = capsys.readouterr().err
    assert "diffusion.beta_schedule is 'squaredcos_cap_v2'" in err and "beta_schedule 'linear'" in err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_generate_rejects_a_tokenizer_that_starts_documents_differently(tiny_dirs, tmp_path, capsys):
    model = _fused_with(tiny_dirs, tmp_path / "m", document_prefix=[5])
    assert main(["generate", "text", "--model", model, "--prompt", "w3", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "starts documents with [1]" in err and "documents starting with [5]" in err
    same = _fused_with(tiny_dirs, tmp_path / "same", document_prefix=[1])  # what the tiny tokenizer adds: BOS
    assert main(["generate", "text", "--model", same, "--prompt", "w3", "--max-new-tokens", "2"]) == 0
