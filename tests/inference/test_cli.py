"""`megafusion generate ...` end to end on the tiny model, tokenizer and VAE."""

from PIL import Image

from megafusion.cli import main
from megafusion.inference.images import load_latents


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
