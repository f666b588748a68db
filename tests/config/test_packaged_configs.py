"""Configs ship as package data: `--config demo-digits` works as well as a path, from a checkout and from a wheel
installed outside it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from megafusion.cli import main
from megafusion.config import ConfigError, load_config
from megafusion.config.loader import (
    packaged_config_dir,
    packaged_configs,
    packaged_deepspeed_configs,
    resolve_config_path,
)

REPO = Path(__file__).resolve().parents[2]
REPO_CONFIGS = REPO / "configs"


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_every_repo_config_is_packaged():
    assert packaged_configs() == sorted(p.stem for p in REPO_CONFIGS.glob("*.yaml"))
    assert packaged_deepspeed_configs() == sorted(f"deepspeed/{p.name}" for p in REPO_CONFIGS.glob("deepspeed/*.json"))
    assert {"demo-digits", "demo-shapes", "tiny-cpu"} <= set(packaged_configs())


@pytest.mark.parametrize("spec", ["demo-digits", "demo-digits.yaml", "configs/demo-digits.yaml"])
def test_names_resolve_to_the_packaged_file(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout: `configs/...` only exists as package data
    path = resolve_config_path(spec)
    assert path == packaged_config_dir() / "demo-digits.yaml"
    assert load_config(spec) == load_config(REPO_CONFIGS / "demo-digits.yaml")


@pytest.mark.parametrize("spec", ["deepspeed/zero3.json", "configs/deepspeed/zero3.json"])
def test_deepspeed_templates_resolve(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert json.loads(resolve_config_path(spec).read_text()) == json.loads(
        (REPO_CONFIGS / "deepspeed" / "zero3.json").read_text())


def test_an_existing_path_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-digits.yaml").write_text("optim:\n  lr_image: 3.0e-4\n")
    assert resolve_config_path("demo-digits.yaml") == Path("demo-digits.yaml")
    assert load_config("demo-digits.yaml").optim.lr_image == 3e-4
    assert resolve_config_path(tmp_path / "demo-digits.yaml") == tmp_path / "demo-digits.yaml"


@pytest.mark.parametrize("spec", ["no-such-config", "configs/no-such.yaml", "../configs/tiny-cpu", "/nowhere/x.yaml"])
def test_unknown_config_lists_the_packaged_names(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no such config file") as excinfo:
        load_config(spec)
    assert spec in str(excinfo.value)
    assert all(name in str(excinfo.value) for name in [*packaged_configs(), *packaged_deepspeed_configs()])


def test_cli_accepts_a_packaged_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "--config", "tiny-cpu", "--optim.lr_image=3e-4"]) == 0
    assert "lr_image: 0.0003" in capsys.readouterr().out
    assert main(["config", "--config", "tiny-cpuu"]) == 2
    assert "packaged: " in capsys.readouterr().err


def test_demo_config_is_the_packaged_one(tmp_path, monkeypatch):
    from megafusion.demo.pipeline import DemoSettings, demo_config

    monkeypatch.chdir(tmp_path)
    cfg, path = demo_config(DemoSettings(dataset="shapes", out=tmp_path / "out"))
    assert path == packaged_config_dir() / "demo-shapes.yaml"
    assert cfg.train.output_dir == str((tmp_path / "out").resolve() / "run")
    _, path = demo_config(DemoSettings(out=tmp_path / "out", config="tiny-cpu"))
    assert path == packaged_config_dir() / "tiny-cpu.yaml"


def test_pyproject_lists_every_package():
    # An explicit `packages` list silently leaves a new subpackage out of the wheel; the editable install hides it.
    tool = _pyproject()["tool"]["setuptools"]
    dirs = {name: REPO / path for name, path in tool["package-dir"].items()}
    found = set()
    for top, root in dirs.items():
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            found.add(".".join([top, *rel.parts]))
    assert found <= set(tool["packages"]), sorted(found - set(tool["packages"]))


# --- slow: a real wheel, installed outside the checkout ---------------------------------------------------------


def _copy_sources(dest: Path) -> Path:
    """What the wheel is built from, copied so the build's build/ and egg-info never land in the shared checkout."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for path in set(_pyproject()["tool"]["setuptools"]["package-dir"].values()):
        shutil.copytree(REPO / path, dest / path, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


PROBE = """
import json
from pathlib import Path

import megafusion
from megafusion.config.loader import load_config, packaged_configs, packaged_deepspeed_configs, resolve_config_path
from megafusion.demo.pipeline import DemoSettings, demo_config

cfg = load_config("demo-digits")
_, demo_path = demo_config(DemoSettings(out=Path("out")))
print(json.dumps({
    "megafusion": megafusion.__file__,
    "demo_digits": str(resolve_config_path("demo-digits")),
    "base": cfg.model.base,
    "latent_channels": cfg.image.latent_channels,
    "demo_config": str(demo_path),
    "zero3": json.loads(resolve_config_path("configs/deepspeed/zero3.json").read_text()),
    "packaged": packaged_configs(),
    "deepspeed": packaged_deepspeed_configs(),
}))
"""


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_finds_its_configs(tmp_path):
    src = _copy_sources(tmp_path / "src")
    dist, site, cwd = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    cwd.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # The venv's setuptools when it has one (no download); a venv without it (Python 3.12+) fetches it from PyPI.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([*pip, "wheel", "--no-deps", *isolation, "-w", str(dist), str(src)], check=True,
                   cwd=tmp_path, capture_output=True, timeout=600)
    (wheel,) = dist.glob("megafusion-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "megafusion/configs/demo-digits.yaml" in names and "megafusion/configs/deepspeed/zero3.json" in names
    assert "megafusion/common/atomic.py" in names
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   cwd=tmp_path, capture_output=True, timeout=600)

    # -S: no site-packages processing, so the checkout's editable-install hook never runs; the venv's
    # site-packages only supplies the dependencies, after the wheel's copy.
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *deps])
    proc = subprocess.run([sys.executable, "-S", "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])

    assert Path(got["megafusion"]).is_relative_to(site), got["megafusion"]
    packaged = site / "megafusion" / "configs"
    assert Path(got["demo_digits"]) == packaged / "demo-digits.yaml" == Path(got["demo_config"])
    repo_cfg = load_config(REPO_CONFIGS / "demo-digits.yaml")
    assert (got["base"], got["latent_channels"]) == (repo_cfg.model.base, repo_cfg.image.latent_channels)
    assert got["zero3"] == json.loads((REPO_CONFIGS / "deepspeed" / "zero3.json").read_text())
    assert got["packaged"] == sorted(p.stem for p in REPO_CONFIGS.glob("*.yaml"))
    assert got["deepspeed"] == sorted(f"deepspeed/{p.name}" for p in REPO_CONFIGS.glob("deepspeed/*.json"))

    cli = subprocess.run([sys.executable, "-S", "-m", "megafusion", "config", "--config", "demo-digits"], cwd=cwd,
                         env=env, capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert f"base: {repo_cfg.model.base}" in cli.stdout
