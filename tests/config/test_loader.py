"""Strict config loading: every shipped YAML validates; bad keys and values name the file and key."""

from pathlib import Path

import pytest

from megafusion.cli import main
from megafusion.config import ConfigError, MegaFusionConfig, load_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, MegaFusionConfig)


def test_defaults_are_the_papers():
    cfg = load_config()
    assert (cfg.optim.lr_image, cfg.optim.lr_min_image, cfg.optim.warmup_steps) == (1e-4, 1.5e-5, 4000)
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.eps) == (0.9, 0.95, 1e-8)
    assert cfg.optim.lr_text == 0.0 and cfg.diffusion.loss_weight == 5.0
    assert cfg.diffusion.num_train_timesteps == 1000 and cfg.image.tokens_per_image == 256


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    path = _write(tmp_path, "optim:\n  lr_imgae: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown key 'optim\.lr_imgae'"):
        load_config(path)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'"):
        load_config(_write(tmp_path, "optimizer: {}\n"))


@pytest.mark.parametrize(
    "text, key",
    [
        ("model:\n  separation: sideways\n", "model.separation"),
        ("optim:\n  warmup_steps: 1.5\n", "optim.warmup_steps"),
        ("optim:\n  lr_image: -1\n", "optim.lr_image"),
        ("image:\n  latent_size: 30\n  patch_size: 4\n", "image.patch_size"),
        ("unet:\n  channels: 48\n  norm_groups: 32\n", "unet.norm_groups"),
        ("unet:\n  token_init_scale: 0\n", "unet.token_init_scale"),
        ("diffusion:\n  image_first_max_timestep: 1000\n", "diffusion.image_first_max_timestep"),
        ("diffusion:\n  timestep_sampling: lognormal\n", "diffusion.timestep_sampling"),
        ("diffusion:\n  logit_std: 0\n", "diffusion.logit_std"),
        ("optim:\n  lr_text: fast\n", "optim.lr_text"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=rf"run\.yaml.*key '{key}"):
        load_config(_write(tmp_path, text))


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads `1e-4` as a string (YAML 1.1); users write it anyway.
    assert load_config(_write(tmp_path, "optim:\n  lr_image: 1e-4\n")).optim.lr_image == 1e-4


def test_dotted_overrides(tmp_path):
    path = _write(tmp_path, "optim:\n  lr_image: 1.0e-4\n")
    cfg = load_config(path, ["--optim.lr_image=2e-4", "--model.separation=ffn", "--unet.num_blocks=3"])
    assert (cfg.optim.lr_image, cfg.model.separation, cfg.unet.num_blocks) == (2e-4, "ffn", 3)
    with pytest.raises(ConfigError, match="command line: unknown key 'optim.lr_imag'"):
        load_config(path, ["--optim.lr_imag=2e-4"])
    with pytest.raises(ConfigError, match="key 'optim.lr_image'"):
        load_config(path, ["--optim.lr_image=-3"])


def test_unsafe_yaml_is_refused(tmp_path):
    path = _write(tmp_path, "model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_cli_config_reports_errors_without_traceback(tmp_path, capsys):
    path = _write(tmp_path, "optim:\n  lr_imgae: 1\n")
    assert main(["config", "--config", str(path)]) == 2
    assert "unknown key 'optim.lr_imgae'" in capsys.readouterr().err
    assert main(["config", "--config", str(path.with_name("missing.yaml"))]) == 2
    assert main(["config", "--optim.lr_image=3e-4"]) == 0
    assert "lr_image: 0.0003" in capsys.readouterr().out
