"""The trainer's own step in fp32 against bf16, on the demo config: what `precision: auto` should have picked.

benchmarks/train_step.py times the objective with the model cast to bf16; the trainer's bf16 is DeepSpeed's
mixed-precision mode (bf16 weights and gradients, fp32 master weights, gradients converted and checked for
overflow every step), whose per-parameter work a matmul probe does not see. This runs `megafusion train` itself
(DeepSpeed engine, loader, weight average) for a few steps per precision on random-latent shards of demo-digit
captions (speed does not depend on the latent values), alternating the arms so machine noise hits both, and
reports the median `step_time_s` of metrics.jsonl (first steps dropped: warm-up), each run's wall time, the
bf16 / fp32 ratio, and what the `auto` probe picks on this machine.

    python benchmarks/trainer_precision.py [--steps 15 --skip 3 --rounds 2 --config demo-digits]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megafusion.checkpoint.builtin_bases import resolve_base  # noqa: E402
from megafusion.common.precision import choose_precision, cpu_info, model_matmul_shapes  # noqa: E402
from megafusion.config import load_config  # noqa: E402
from megafusion.data_pipeline.demo.digits import digit_caption  # noqa: E402
from megafusion.data_pipeline.shard_format import INDEX_NAME, shard_name, write_shard_file  # noqa: E402
from megafusion.training.torch_engine import base_arch  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def write_random_shards(root: Path, shape: tuple[int, int, int], count: int) -> Path:
    """One shard of `count` demo-digit captions with random latents of `shape`."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(count):
        key = f"digits-bench-{i:06d}"
        items.append((digit_caption(i % 10, key), torch.randn(shape, generator=g), key))
    counts = [write_shard_file(root / shard_name(0), iter(items))]
    (root / INDEX_NAME).write_text(json.dumps({"num_shards": 1, "counts": counts, "latent_shape": list(shape)}))
    return root


def train_run(config: str, shards: Path, out: Path, precision: str, steps: int,
              threads: int) -> tuple[list[float], float]:
    """(step_time_s of every step, wall seconds) of one `megafusion train` run."""
    cmd = [sys.executable, "-m", "megafusion", "train", "--config", config, f"--data.shards={shards}",
           f"--train.output_dir={out}", f"--train.max_steps={steps}", f"--train.save_every={10**9}",
           f"--train.precision={precision}", "--train.log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in records if "step_time_s" in r], wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo-digits")
    parser.add_argument("--steps", type=int, default=15, help="training steps per run")
    parser.add_argument("--skip", type=int, default=3, help="first steps of each run left out (warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per precision, alternating")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.steps <= args.skip:
        raise SystemExit("--steps must exceed --skip")
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    cpu = cpu_info()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU: {cpu['model']} (flags: {' '.join(cpu['flags']) or 'none of interest'}), torch {torch.__version__}, "
          f"{args.threads} threads, 1-min load average {load:.1f} on {os.cpu_count()} CPUs before the run")
    arch = base_arch(resolve_base(cfg.model.base))
    choice = choose_precision("auto", "cpu", model_matmul_shapes(arch.hidden_size, arch.intermediate_size))
    print(f"precision auto picks {choice.precision}: {choice.reason}")

    steps: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    walls: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    with tempfile.TemporaryDirectory(prefix="megafusion-precision-") as tmp:
        shape = (cfg.image.latent_channels, cfg.image.latent_size, cfg.image.latent_size)
        shards = write_random_shards(Path(tmp) / "shards", shape, 600)
        for r in range(args.rounds):
            for precision in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
                times, wall = train_run(args.config, shards, Path(tmp) / f"run-{r}-{precision}", precision,
                                        args.steps, args.threads)
                kept = times[args.skip:]
                steps[precision] += kept
                walls[precision].append(wall)
                print(f"  round {r} {precision}: median step {statistics.median(kept):.2f} s over {len(kept)} steps "
                      f"(all: {' '.join(f'{t:.2f}' for t in times)}), run wall {wall:.0f} s", flush=True)
    med = {p: statistics.median(steps[p]) for p in PRECISIONS}
    for p in PRECISIONS:
        print(f"{p}: median step {med[p]:.2f} s, run walls {' '.join(f'{w:.0f}' for w in walls[p])} s")
    ratio = med["bf16"] / med["fp32"]
    faster = "bf16" if ratio < 1 else "fp32"
    print(f"bf16 / fp32 trainer step time: {ratio:.2f}x ({faster} is faster); auto picks {choice.precision}"
          + ("" if faster == choice.precision else " -- not the faster one on this machine"))


if __name__ == "__main__":
    main()
