"""One demo training step timed: with and without the frozen-row split, in fp32 and bf16, and its MFU.

The step is configs/demo-digits.yaml's: SmolLM2-135M-Instruct (the cached real base, ~/.cache/megafusion),
deep separation, text frozen, the config's micro-batch of 256-token rows of packed digit documents (the demo's
captions through the real tokenizer and packer, caption first with the config's probability, random 4x8x8
latents: speed does not depend on their values). One step = the objective's forward, backward, gradient clipping
and AdamW over the image groups (build_optimizer), without the DeepSpeed engine around it; bf16 casts the model
as DeepSpeed's bf16 mode does, but without its fp32 master weights and gradient conversions
(benchmarks/trainer_precision.py times the trainer's own bf16 step). The split (train.skip_frozen_rows) runs the
rows no trainable parameter reaches without autograd; with and without it alternate step by step on the same
batches, so machine noise hits both alike, and the median is reported. MFU = the step's model FLOPs
(training/flops.py, which counts the frozen rows' forward only) / time / this machine's matmul peak measured for
the same dtype and thread count (benchmarks/matmul_peak.py).

    python benchmarks/train_step.py [--steps 3 --warmup 1 --bf16-steps 1 --threads 2 --no-bf16]

On a CPU without fast bf16 (AVX2 only) a bf16 step of this model takes minutes: --bf16-steps 1 (no warm-up) by
default, --no-bf16 to leave it out.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.matmul_peak import DTYPES, measure  # noqa: E402
from megafusion.checkpoint.builtin_bases import resolve_base  # noqa: E402
from megafusion.common.precision import choose_precision, cpu_info, model_matmul_shapes  # noqa: E402
from megafusion.config import load_config  # noqa: E402
from megafusion.config.schema import MegaFusionConfig  # noqa: E402
from megafusion.data_pipeline.demo.digits import digit_caption  # noqa: E402
from megafusion.data_pipeline.packing import SequencePacker, collate_packed  # noqa: E402
from megafusion.data_pipeline.tokenizer import load_tokenizer  # noqa: E402
from megafusion.model import LlamaFusion, TokenLayout  # noqa: E402
from megafusion.training.flops import count_step_flops  # noqa: E402
from megafusion.training.objective import TransfusionObjective, build_objective  # noqa: E402
from megafusion.training.optim import build_optimizer  # noqa: E402


def demo_batches(cfg: MegaFusionConfig, base: Path, model: LlamaFusion, count: int) -> list[dict]:
    """`count` collated micro-batches laid out exactly as the demo's loader lays them out."""
    tok = load_tokenizer(base)
    packer = SequencePacker(cfg.data.max_len, cfg.image.tokens_per_image, model.boi_id, model.eoi_id,
                            tok.prefix_ids, tok.eos_id, tok.eos_id if tok.eos_id is not None else 0)
    g = torch.Generator().manual_seed(0)
    shape = (cfg.image.latent_channels, cfg.image.latent_size, cfg.image.latent_size)
    rows, i = [], 0
    while len(rows) < count * cfg.train.micro_batch_size:
        key = f"digits-bench-{i:06d}"
        label = int(torch.randint(0, 10, (1,), generator=g))
        image_first = bool(torch.rand(1, generator=g) >= cfg.data.caption_first_prob)
        doc = packer.document(key, tok.encode(digit_caption(label, key)), torch.randn(shape, generator=g),
                              image_first)
        if (row := packer.add(doc)) is not None:
            rows.append(row)
        i += 1
    size = cfg.train.micro_batch_size
    return [collate_packed(rows[j : j + size]) for j in range(0, len(rows), size)]


def train_step(model: LlamaFusion, optimizer: torch.optim.Optimizer, objective: TransfusionObjective,
               batch: dict, grad_clip: float, seed: int) -> tuple[float, int]:
    """(seconds, model FLOPs) of one step."""
    dtype = next(model.parameters()).dtype
    start = time.perf_counter()
    out = objective(model, batch["input_ids"], batch["modality"], latents=batch["latents"].to(dtype),
                    image_first=batch["image_first"], doc_ids=batch["doc_ids"], labels=batch["labels"],
                    generator=torch.Generator().manual_seed(seed))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    layout = TokenLayout.build(batch["input_ids"], batch["modality"], doc_ids=batch["doc_ids"],
                               tokens_per_image=model.image_config.tokens_per_image)
    flops = count_step_flops(model, layout, out.num_text_targets, False, True, out.frozen_rows,
                             out.num_frozen_lm_rows)
    return seconds, flops.total


def run(model: LlamaFusion, cfg: MegaFusionConfig, batches: list[dict], arms: dict[str, TransfusionObjective],
        warmup: int, steps: int) -> dict[str, tuple[float, float, float]]:
    """(median seconds, fastest seconds, FLOPs per step) per arm over `steps` steps after `warmup`; the arms take
    turns on each batch, in alternating order."""
    optimizer = build_optimizer(model, cfg.optim)
    times: dict[str, list[tuple[float, int]]] = {name: [] for name in arms}
    names = list(arms)
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        for name in names if i % 2 == 0 else names[::-1]:
            result = train_step(model, optimizer, arms[name], batch, cfg.train.grad_clip, seed=i)
            if i >= warmup:
                times[name].append(result)
    for name, results in times.items():
        print(f"  {name}: " + " ".join(f"{s:.2f}" for s, _ in results) + " s")
    return {name: (statistics.median(s for s, _ in results), min(s for s, _ in results),
                   statistics.median(f for _, f in results)) for name, results in times.items()}


def linear_layout_peak(sizes: list[int], dtype: torch.dtype, repeats: int = 3) -> float:
    """GFLOP/s of a @ b.T (how nn.Linear multiplies: the weight is stored transposed), best size. On CPUs without
    native bf16 torch picks different bf16 kernels for the two layouts, several times apart."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        torch.mm(a, b.t())
        seconds = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b.t())
            seconds = min(seconds, time.perf_counter() - start)
        best = max(best, 2 * n**3 / seconds / 1e9)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo-digits")
    parser.add_argument("--base", default="", help="HF Llama directory (default: the config's base, fetched)")
    parser.add_argument("--steps", type=int, default=4, help="timed fp32 steps per arm")
    parser.add_argument("--warmup", type=int, default=1, help="untimed fp32 steps per arm first")
    parser.add_argument("--bf16-steps", type=int, default=1, help="timed bf16 steps (split on; no warm-up)")
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    cfg = load_config(args.config)
    base = Path(args.base) if args.base else resolve_base(cfg.model.base)
    cpu = cpu_info()
    print(f"CPU: {cpu['model']} (flags: {' '.join(cpu['flags']) or 'none of interest'}), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads"
          + (f", 1-min load average {load:.1f} on {os.cpu_count()} CPUs before the run" if load is not None else ""))
    a = cfg.model
    torch.manual_seed(0)
    model = LlamaFusion.from_llama(base, a.separation, cfg.image, cfg.unet, attention=a.attention,
                                   routing=a.routing)
    choice = choose_precision("auto", "cpu", model_matmul_shapes(model.arch.hidden_size,
                                                                model.arch.intermediate_size))
    print(f"precision auto would pick {choice.precision}: {choice.reason}")
    batches = demo_batches(cfg, base, model, max(args.warmup + args.steps, args.bf16_steps))
    b = batches[0]
    print(f"micro-batch: {tuple(b['input_ids'].shape)} tokens, {b['latents'].shape[0]} images; "
          f"{args.warmup} warm-up + {args.steps} timed fp32 steps per arm, {args.bf16_steps} bf16")

    on = build_objective(cfg)
    assert on.skip_frozen_rows, "the split is on by default"
    off = copy.copy(on)
    off.skip_frozen_rows = False
    fp32 = run(model, cfg, batches, {"split": on, "full": off}, args.warmup, args.steps)
    bf16 = None
    if not args.no_bf16 and args.bf16_steps > 0:
        bf16 = run(model.to(torch.bfloat16), cfg, batches, {"split": on}, 0, args.bf16_steps)["split"]

    # The peak of a dtype: the best of matmul_peak.py's square a @ b, the same sizes in nn.Linear's layout, and
    # the precision probe at the model's own shapes (its rates: `choice`).
    sizes = {"fp32": [1024, 2048], "bf16": [256, 1024]}
    probe = {"fp32": choice.fp32_gflops or 0.0, "bf16": choice.bf16_gflops or 0.0}
    peaks = {}
    for name in ["fp32"] + (["bf16"] if bf16 is not None else []):
        square = max(measure(sizes[name], [name], torch.device("cpu"), 3, 0.25)[name].values())
        linear = linear_layout_peak(sizes[name], DTYPES[name])
        peaks[name] = max(square, linear, probe[name])
        print(f"{name} matmul peak ({torch.get_num_threads()} threads): {peaks[name]:.1f} GFLOP/s (a @ b "
              f"{square:.1f}, a @ b.T {linear:.1f}, model shapes {probe[name]:.1f})")

    def line(label: str, seconds: float, fastest: float, flops: float, dtype: str) -> None:
        rate = flops / seconds / 1e9
        print(f"  {label:24s} {seconds:7.2f} s/step (fastest {fastest:6.2f})  {flops / 1e9:6.1f} GFLOP/step  "
              f"{rate:6.1f} GFLOP/s  MFU {rate / peaks[dtype]:6.1%}")

    print("step time (median of the timed steps), model FLOPs (training/flops.py), MFU against the dtype's peak:")
    line("fp32, split (default)", *fp32["split"], "fp32")
    line("fp32, full computation", *fp32["full"], "fp32")
    print(f"  split speed-up, full / split step time: {fp32['full'][0] / fp32['split'][0]:.2f}x median, "
          f"{fp32['full'][1] / fp32['split'][1]:.2f}x fastest")
    if bf16 is not None:
        line("bf16, split", *bf16, "bf16")
        print(f"  bf16 / fp32 step time (split): {bf16[0] / fp32['split'][0]:.2f}x")


if __name__ == "__main__":
    main()
