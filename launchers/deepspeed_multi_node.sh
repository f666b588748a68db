#!/usr/bin/env bash
# Several nodes started by the DeepSpeed launcher from one of them (pdsh over passwordless ssh by default).
# Needs the same checkout and Python environment at the same path on every node (a shared filesystem).
#
#   HOSTFILE=launchers/hostfile CONFIG=configs/llama3-8b-paper.yaml launchers/deepspeed_multi_node.sh \
#       --train.zero_stage=3 --optim.lr_image=1e-4
#
# Everything after the script name is passed to `megafusion train`.
set -euo pipefail

REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
CONFIG="${CONFIG:-configs/llama3-8b-paper.yaml}"
HOSTFILE="${HOSTFILE:-$REPO_DIR/launchers/hostfile}"
# First host of the hostfile unless given (comments and blank lines skipped).
MASTER_ADDR="${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}"
MASTER_PORT="${MASTER_PORT:-29500}"
NUM_NODES="${NUM_NODES:--1}"   # -1 = every host in the hostfile
NUM_GPUS="${NUM_GPUS:--1}"     # -1 = every slot of each host
LAUNCHER="${LAUNCHER:-pdsh}"   # pdsh, openmpi, mvapich, slurm, mpich, impi
DEEPSPEED="${DEEPSPEED:-deepspeed}"

# The remote processes get only PYTHON*/NCCL*/... variables from the launcher's environment; the rest they need
# goes through a DeepSpeed env file (KEY=VALUE lines; DS_ENV_FILE may be an absolute path).
env_file="$(mktemp "${TMPDIR:-/tmp}/megafusion-ds-env.XXXXXX")"
trap 'rm -f "$env_file"' EXIT
{
    echo "OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}"
    echo "HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}"
    echo "MEGAFUSION_CACHE=${MEGAFUSION_CACHE:-$HOME/.cache/megafusion}"
    if [[ -n "${WANDB_MODE:-}" ]]; then echo "WANDB_MODE=$WANDB_MODE"; fi
} >"$env_file"
export DS_ENV_FILE="$env_file"
# NCCL settings for your fabric (exported to every node by the launcher):
# export NCCL_DEBUG=WARN
# export NCCL_SOCKET_IFNAME=eth0
# export NCCL_IB_HCA=mlx5
# export NCCL_IB_DISABLE=0

cd "$REPO_DIR"
# Not exec: the trap removes the env file when the launcher returns.
"$DEEPSPEED" --hostfile "$HOSTFILE" --num_nodes "$NUM_NODES" --num_gpus "$NUM_GPUS" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --launcher "$LAUNCHER" --no_local_rank \
    --module megafusion train --config "$CONFIG" "$@"
