"""Collective traffic of one tensor-parallel training step, measured next to the analytic count.

Spawns `--tp` CPU processes (gloo), tensor-parallelises a random LlamaFusion with megafusion.parallel (text set
frozen, as in training), runs one forward + backward of the Transfusion loss on a mixed text/image batch while
counting every collective DTensor issues (CommDebugMode's counting, without its module tracker: see
CollectiveCounter), and prints the counts and payload, forward and backward, beside what the Megatron split
should cost:

  per layer and per weight set that has rows in the batch (deep: text + image for attention and FFN; ffn: one
  shared attention set, two FFN sets; none: one set each):
    forward : one all-reduce of the row-parallel output of O (attn_out) and of the FFN's down projection;
    backward: one all-reduce of the input gradient of the column-parallel Q/K/V and of gate/up (the norm hands
              them one Replicate input, so the three (two) projections' partial gradients are summed first);
  outside the layers (untied embeddings only; a tied table is replicated): the vocabulary-sharded embedding's
  all-reduce (forward), the LM head's logits all-gather (forward) and its input-gradient all-reduce (backward).

    python benchmarks/tp_comm.py [--tp 2 --separation all --embeddings both --layers 4 --hidden 512 --heads 8]

Exits non-zero if a count differs from the analytic one (tests/parallel/test_tp_comm.py runs it small).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megafusion.model.arch import LlamaArch  # noqa: E402
from megafusion.model.args import ImageConfig, UNetConfig  # noqa: E402
from megafusion.model.fusion import LlamaFusion  # noqa: E402
from megafusion.parallel import MeshLayout, build_device_mesh, parallelize_fusion  # noqa: E402

SEPARATED = {"deep": (True, True), "ffn": (False, True), "none": (False, False)}  # (attention, ffn) per set


class CollectiveCounter(TorchDispatchMode):
    """Counts the collectives (and their input bytes per rank) that run while it is active.

    What CommDebugMode.__torch_dispatch__ does, minus its module tracker: that tracker keys a per-call forward hook
    by module name, so a module called twice in one forward (diffusers' ResnetBlock2D runs its SiLU twice) pops
    its parent stack twice and CommDebugMode raises IndexError (torch 2.13)."""

    NAMESPACES = ("_c10d_functional", "c10d_functional", "c10d")
    COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast")

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.payload = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **(kwargs or {}))
        # Let DTensor desugar its ops first (as CommDebugMode does); its collectives then come through here.
        if any(t is DTensor for t in types):
            return NotImplemented
        packet = func._overloadpacket
        name = packet.__name__
        if packet._qualified_op_name.split("::")[0] in self.NAMESPACES and name.startswith(self.COLLECTIVES):
            self.counts["all_gather" if name.startswith("all_gather") else name.removesuffix("_")] += 1
            self.payload += sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        return func(*args, **(kwargs or {}))


def analytic(args: argparse.Namespace, separation: str, text_rows: int, image_rows: int, targets: int,
             vocab: int) -> dict[str, dict[str, int]]:
    """{"forward"/"backward": {"all_reduce"/"all_gather": count, "bytes": payload per rank}} (fp32)."""
    d, row = args.hidden, 4 * args.hidden
    sets_rows = []  # rows each used weight set's row-parallel output (and column-parallel input) carries
    for separate in SEPARATED[separation]:
        sets_rows += [text_rows, image_rows] if separate else [text_rows + image_rows]
    per_layer = len(sets_rows)
    out = {phase: {"all_reduce": per_layer * args.layers, "all_gather": 0,
                   "bytes": sum(sets_rows) * row * args.layers} for phase in ("forward", "backward")}
    if not args.tied:
        out["forward"]["all_reduce"] += 1  # embedding (vocabulary rows split): partial lookups summed
        out["forward"]["bytes"] += text_rows * d * 4
        out["forward"]["all_gather"] += 1  # LM head (vocabulary columns split): logits gathered
        out["forward"]["bytes"] += targets * (vocab // args.tp) * 4
        out["backward"]["all_reduce"] += 1  # LM head input gradient
        out["backward"]["bytes"] += targets * d * 4
    return out


def batch(model: LlamaFusion, rows: int, seq: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Each row: 8 text tokens, BOI, one image, EOI, text up to `seq`."""
    n, vocab = model.image_config.tokens_per_image, model.arch.vocab_size
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    modality = torch.zeros(rows, seq, dtype=torch.long)
    ids[:, 8], ids[:, 9 + n] = model.boi_id, model.eoi_id
    modality[:, 9:9 + n] = 1
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    targets[:, :-1][modality[:, 1:] == 1] = -100
    c, s = model.image_config.latent_channels, model.image_config.latent_size
    return {"input_ids": ids, "modality": modality, "images": torch.randn(rows, c, s, s, generator=g),
            "timesteps": torch.randint(0, 1000, (rows,), generator=g), "lm_targets": targets}


def worker(rank: int, args: argparse.Namespace, port: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.tp)
    args.tied = False
    mesh = build_device_mesh(MeshLayout(1, 1, args.tp).resolve(args.tp, _arch(args)), "cpu")
    image = ImageConfig(latent_channels=4, latent_size=8, patch_size=2)
    unet = UNetConfig(channels=32, num_blocks=2, norm_groups=8, time_embed_dim=64)
    separations = list(SEPARATED) if args.separation == "all" else [args.separation]
    mismatches = 0
    ties = {"untied": [False], "tied": [True], "both": [False, True]}[args.embeddings]
    for separation, tied in ((s, t) for s in separations for t in ties):
        args.tied = tied
        torch.manual_seed(0)
        model = LlamaFusion(_arch(args), separation, image, unet)
        for name, p in model.named_parameters():
            p.requires_grad_(LlamaFusion.parameter_group(name) == "image")
        parallelize_fusion(model, mesh)
        inputs = batch(model, args.rows, args.seq, torch.Generator().manual_seed(1))
        forward, backward = CollectiveCounter(), CollectiveCounter()
        with forward:
            out = model(**inputs, compute_logits=False)
            loss = F.cross_entropy(out.lm_logits, out.lm_targets) + F.mse_loss(out.noise_pred, inputs["images"])
        with backward:
            loss.backward()
        image_rows = int(inputs["modality"].sum())
        text_rows = inputs["modality"].numel() - image_rows
        expected = analytic(args, separation, text_rows, image_rows, out.lm_targets.numel(), model.arch.vocab_size)
        if rank != 0:
            continue
        print(f"\nseparation={separation}  tp={args.tp}  layers={args.layers}  hidden={args.hidden}  "
              f"rows: {text_rows} text + {image_rows} image  {'tied' if args.tied else 'untied'} embeddings")
        print(f"  {'phase':9s} {'collective':12s} {'measured':>9s} {'analytic':>9s}")
        for phase, counter in (("forward", forward), ("backward", backward)):
            for op in sorted(set(counter.counts) | {"all_reduce", "all_gather"}):
                want = expected[phase].get(op, 0)
                mismatches += counter.counts[op] != want
                print(f"  {phase:9s} {op:12s} {counter.counts[op]:9d} {want:9d}")
            mismatches += counter.payload != expected[phase]["bytes"]
            got_mb, want_mb = counter.payload / 2**20, expected[phase]["bytes"] / 2**20
            print(f"  {phase:9s} {'payload MiB':12s} {got_mb:9.3f} {want_mb:9.3f}")
    if rank == 0:
        print("\nall counts and payloads match the analytic ones" if not mismatches
              else f"\n{mismatches} counts or payloads DIFFER")
    dist.destroy_process_group()
    if mismatches:
        sys.exit(1)


def _arch(args: argparse.Namespace) -> LlamaArch:
    return LlamaArch(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                     num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                     head_dim=args.hidden // args.heads, tie_word_embeddings=args.tied)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--separation", choices=["all", *SEPARATED], default="all")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--embeddings", choices=["untied", "tied", "both"], default="untied",
                   help="untied: vocabulary-sharded table and head; tied: one replicated table")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args, port), nprocs=args.tp)


if __name__ == "__main__":
    main()
