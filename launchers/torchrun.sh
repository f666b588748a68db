#!/usr/bin/env bash
# torchrun on one node (default) or on several: run this script once on every node with the same
# NNODES / MASTER_ADDR / MASTER_PORT / RDZV_ID, and NODE_RANK = 0 .. NNODES-1.
#
#   NPROC_PER_NODE=8 launchers/torchrun.sh --optim.lr_image=2e-4                     # one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=worker-1 launchers/torchrun.sh                    # on worker-1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=worker-1 launchers/torchrun.sh                    # on worker-2
#
# The torch engine with a layout (tp x dp_shard [x dp_replicate] = NNODES x NPROC_PER_NODE; `megafusion plan`
# recommends one). tp stays inside a node; dp_replicate > 1 replicates across nodes and shards within:
#   NPROC_PER_NODE=8 CONFIG=configs/llama3-8b-paper.yaml launchers/torchrun.sh \
#       --train.engine=torch --parallel.tp=2 --parallel.dp_shard=4
#   NNODES=4 NODE_RANK=... MASTER_ADDR=worker-1 CONFIG=configs/llama3-70b-paper.yaml launchers/torchrun.sh \
#       --train.engine=torch --parallel.tp=8 --parallel.dp_replicate=4 --parallel.dp_shard=1
#
# Everything after the script name is passed to `megafusion train`. For a CPU run set DS_ACCELERATOR=cpu.
set -euo pipefail

REPO_DIR="${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
CONFIG="${CONFIG:-configs/smollm2-135m-deep.yaml}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    # One process per GPU; one process when there is none (nvidia-smi absent or listing nothing).
    NPROC_PER_NODE="$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true)"
    if [[ "$NPROC_PER_NODE" -lt 1 ]]; then NPROC_PER_NODE=1; fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
RDZV_ID="${RDZV_ID:-megafusion}"
TORCHRUN="${TORCHRUN:-torchrun}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

if [[ "$NNODES" -eq 1 ]]; then
    # --standalone: a local rendezvous on a free port, so two runs on one machine do not collide.
    dist_args=(--standalone --nnodes 1)
else
    dist_args=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --rdzv_backend c10d
               --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID")
fi

cd "$REPO_DIR"
exec "$TORCHRUN" "${dist_args[@]}" --nproc_per_node "$NPROC_PER_NODE" \
    -m megafusion train --config "$CONFIG" "$@"
