#!/usr/bin/env bash
# One node, one process per GPU, started by the DeepSpeed launcher.
#
#   launchers/deepspeed_single_node.sh                                   # all GPUs, default config
#   NUM_GPUS=4 CONFIG=configs/smollm2-135m-deep.yaml launchers/deepspeed_single_node.sh --optim.lr_image=2e-4
#
# Everything after the script name is passed to `megafusion train` (dotted --section.key=value overrides).
# Paths (CONFIG, data, output) are relative to the repository root, which the script changes into.
set -euo pipefail

REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
CONFIG="${CONFIG:-configs/smollm2-135m-deep.yaml}"
# -1 = every GPU DeepSpeed detects on this node.
NUM_GPUS="${NUM_GPUS:--1}"
MASTER_PORT="${MASTER_PORT:-29500}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

cd "$REPO_DIR"
# --module runs `python -m megafusion ...` in every process. --no_local_rank: the launcher would otherwise put
# `--local_rank=N` before the `train` subcommand; the rank reaches the trainer through LOCAL_RANK instead.
exec "$DEEPSPEED" --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --no_local_rank \
    --module megafusion train --config "$CONFIG" "$@"
