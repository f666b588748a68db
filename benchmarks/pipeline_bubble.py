"""Pipeline bubble and boundary traffic of megafusion.parallel.pipeline, measured next to the theory.

Spawns `--pp` CPU processes (gloo), one pipeline stage each, over a random LlamaFusion (text set frozen), and runs
training steps (forward + backward of every micro-batch) with GPipe and 1F1B at two micro-batch counts. Per rank:

  * bubble: 1 - (time inside the stage's forward and backward of a micro-batch) / (step wall time), from
    timestamps around PipelineStage.forward_one_chunk / backward_one_chunk, printed beside the schedule's
    theoretical (p - 1) / (m + p - 1) (equal stage times, free communication);
  * bytes sent across each stage boundary per step (every point-to-point send the schedule posts, counted when
    torch.distributed.pipelining builds it) beside the analytic count: per micro-batch, forward h (rows x seq x
    hidden) and the U-Net skip (max images x channels x latent^2), and backward their gradients, in fp32.

    python benchmarks/pipeline_bubble.py [--pp 2 --microbatches 4,8 --layers 8 --hidden 256 --seq 128 --steps 3]

The first step of each schedule (metadata inference, warm-up) is not measured. Exits non-zero if a measured byte
count differs from the analytic one (the bubble is a timing and is only printed).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megafusion.model.arch import LlamaArch  # noqa: E402
from megafusion.model.args import ImageConfig, UNetConfig  # noqa: E402
from megafusion.model.fusion import LlamaFusion  # noqa: E402
from megafusion.parallel import MeshLayout  # noqa: E402
from megafusion.parallel.pipeline import (  # noqa: E402
    PipelineRunner,
    build_pipeline_mesh,
    build_stages,
    load_stage_weights,
    parallelize_stage,
)
from megafusion.parallel.pipeline_split import max_images_per_row, plan_pipeline  # noqa: E402
from megafusion.training.objective import LossNormalizer  # noqa: E402

IMAGE = ImageConfig(latent_channels=4, latent_size=8, patch_size=2)  # 16 tokens per image
UNET = UNetConfig(channels=32, num_blocks=2, norm_groups=8, time_embed_dim=64)
ROWS = 2


class CountingP2POp(dist.P2POp):
    """dist.P2POp that adds the bytes of every send to SENT[peer] (the stage builds its ops through dist.P2POp)."""

    SENT: dict[int, int] = defaultdict(int)

    def __init__(self, op, tensor, peer=None, group=None, tag=0, group_peer=None) -> None:  # noqa: ANN001
        super().__init__(op, tensor, peer, group, tag, group_peer)
        if op is dist.isend:
            CountingP2POp.SENT[peer if peer is not None else group_peer] += tensor.numel() * tensor.element_size()


def micro_batch(vocab: int, seq: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """ROWS rows of `seq` tokens, each: 8 text tokens, BOI, one image, EOI, text to the end."""
    n = IMAGE.tokens_per_image
    ids, mod = [], []
    for _ in range(ROWS):
        tail = seq - 8 - n - 2
        ids.append(torch.randint(0, vocab, (8,), generator=g).tolist() + [vocab] + [0] * n + [vocab + 1]
                   + torch.randint(0, vocab, (tail,), generator=g).tolist())
        mod.append([0] * 9 + [1] * n + [0] * (1 + tail))
    input_ids, modality = torch.tensor(ids), torch.tensor(mod)
    targets = torch.full_like(input_ids, -100)
    targets[:, :-1] = input_ids[:, 1:]
    targets[:, :-1][modality[:, 1:] == 1] = -100
    return {"input_ids": input_ids, "modality": modality, "doc_ids": torch.zeros_like(modality), "targets": targets}


def stacked(m: int, vocab: int, seq: int, max_images: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batches = [micro_batch(vocab, seq, g) for _ in range(m)]
    out = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    shape = (m * max_images, IMAGE.latent_channels, IMAGE.latent_size, IMAGE.latent_size)
    out["noise"], out["noisy"] = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    out["timesteps"] = torch.randint(0, 1000, (m * max_images,), generator=g)
    out["image_weights"] = torch.ones(m * max_images)
    return out


def timed(stage, name: str, spans: list[tuple[float, float]]) -> None:  # noqa: ANN001
    inner = getattr(stage, name)

    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spans.append((start, time.perf_counter()))

    setattr(stage, name, wrapper)


def run(rank: int, args: argparse.Namespace, schedule: str, m: int) -> tuple[list[float], int]:
    arch = LlamaArch(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                     num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.heads // 2,
                     head_dim=args.hidden // args.heads, tie_word_embeddings=False)
    torch.manual_seed(0)
    full = LlamaFusion(arch, "deep", IMAGE, UNET)
    plan = plan_pipeline(pp=args.pp, schedule=schedule, microbatches=m, pp_layers=[], num_layers=args.layers,
                         grad_accum_steps=m, engine="torch")
    mesh = build_pipeline_mesh(args.pp, MeshLayout(1, 1, 1), "cpu")
    with torch.device("meta"):
        meta = LlamaFusion(arch, "deep", IMAGE, UNET)
    for name, p in meta.named_parameters():
        p.requires_grad_(LlamaFusion.parameter_group(name) == "image")
    max_images = ROWS * max_images_per_row(args.seq, IMAGE.tokens_per_image)
    stages = build_stages(meta, plan, rank, max_images)
    for stage in stages:
        parallelize_stage(stage, mesh)
        load_stage_weights(stage, full.state_dict())
    runner = PipelineRunner(plan, stages, mesh)
    spans: list[tuple[float, float]] = []
    for name in ("forward_one_chunk", "backward_one_chunk"):
        timed(runner.schedule._stage, name, spans)
    x = stacked(m, args.vocab, args.seq, max_images)
    normalizer = LossNormalizer(float((x["targets"] != -100).sum()), float(x["noise"][:1].numel() * m * ROWS))
    idle, sent = [], 0
    for step in range(args.steps + 1):
        dist.barrier()
        spans.clear()
        CountingP2POp.SENT.clear()
        start = time.perf_counter()
        runner.step(x["input_ids"], x["noisy"], x, normalizer, 5.0)
        end = time.perf_counter()
        for stage in stages:
            stage.zero_grad(set_to_none=True)
        window = torch.tensor([end - start], dtype=torch.float64)
        dist.all_reduce(window, op=dist.ReduceOp.MAX)  # the step ends when its slowest rank is done
        if step == 0:
            continue  # metadata inference and warm-up
        busy = sum(b - a for a, b in spans)
        idle.append(1.0 - busy / window.item())
        sent = CountingP2POp.SENT.get(rank + 1, 0)  # forward sends to the next stage (backward goes to rank - 1)
    return idle, sent


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.pp)
    dist.P2POp = CountingP2POp  # type: ignore[misc]  # counted at construction, in this process only
    p = args.pp
    bytes_h = ROWS * args.seq * args.hidden * 4
    bytes_skip = ROWS * max_images_per_row(args.seq, IMAGE.tokens_per_image) * UNET.channels * IMAGE.latent_size**2 * 4
    ok = True
    rows = []
    for schedule in ("gpipe", "1f1b"):
        for m in args.microbatches:
            idle, sent = run(rank, args, schedule, m)
            # Bytes over boundary r -> r+1 (activations) and r+1 -> r (their gradients) per step.
            gathered = [torch.zeros(2, dtype=torch.float64) for _ in range(p)]
            backward = CountingP2POp.SENT.get(rank - 1, 0) if rank > 0 else 0
            dist.all_gather(gathered, torch.tensor([float(sent), float(backward)], dtype=torch.float64))
            mean_idle = torch.tensor([sum(idle) / len(idle)], dtype=torch.float64)
            idles = [torch.zeros(1, dtype=torch.float64) for _ in range(p)]
            dist.all_gather(idles, mean_idle)
            if rank == 0:
                theory = (p - 1) / (m + p - 1)
                analytic = m * (bytes_h + bytes_skip)
                for boundary in range(p - 1):
                    forward_bytes = int(gathered[boundary][0])
                    backward_bytes = int(gathered[boundary + 1][1])
                    good = forward_bytes == analytic and backward_bytes == analytic
                    ok &= good
                    rows.append(f"{schedule:<6} m={m:<3} boundary {boundary}->{boundary + 1}: sent forward "
                                f"{forward_bytes:>10} B, backward {backward_bytes:>10} B; analytic {analytic:>10} B "
                                f"each ({m} x (h {bytes_h} + skip {bytes_skip})) {'ok' if good else 'MISMATCH'}")
                idle_s = " ".join(f"{float(t):.2f}" for t in idles)
                rows.append(f"{schedule:<6} m={m:<3} bubble per stage (measured) {idle_s}; theoretical "
                            f"(p-1)/(m+p-1) = {theory:.2f}")
    if rank == 0:
        print(f"pipeline bubble: pp {p}, {args.layers} layers (hidden {args.hidden}), micro-batch {ROWS} x "
              f"{args.seq} tokens with 1 image per row, {args.steps} measured steps per setting")
        print("\n".join(rows))
        print("all byte counts match the analytic ones" if ok else "BYTE COUNT MISMATCH")
    dist.destroy_process_group()
    if not ok:
        sys.exit(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--microbatches", type=lambda s: [int(x) for x in s.split(",")], default=[4, 8])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.pp)


if __name__ == "__main__":
    main()
