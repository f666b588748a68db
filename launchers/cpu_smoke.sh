#!/usr/bin/env bash
# Two CPU processes (gloo) training the tiny built-in config: the whole distributed path without a GPU.
#
#   launchers/cpu_smoke.sh                                   # configs/tiny-cpu.yaml, 2 processes
#   NPROC=2 launchers/cpu_smoke.sh --train.max_steps=5 --optim.lr_image=2e-3
#   NPROC=2 launchers/cpu_smoke.sh --train.engine=torch --parallel.tp=2        # tensor parallel, DCP checkpoints
#
# Everything after the script name is passed to `megafusion train`.
set -euo pipefail

REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
CONFIG="${CONFIG:-configs/tiny-cpu.yaml}"
NPROC="${NPROC:-2}"
# Prefer the repository's venv (what `make test` creates) over whatever torchrun is on PATH.
if [[ -z "${TORCHRUN:-}" ]]; then
    if [[ -x "$REPO_DIR/.venv/bin/torchrun" ]]; then TORCHRUN="$REPO_DIR/.venv/bin/torchrun"; else TORCHRUN=torchrun; fi
fi
export DS_ACCELERATOR=cpu
# Two processes on a small machine: one thread each avoids oversubscribing the cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

cd "$REPO_DIR"
exec "$TORCHRUN" --standalone --nproc_per_node "$NPROC" -m megafusion train --config "$CONFIG" "$@"
