"""Is the loader ever the bottleneck? Prints, in one run and for the same config, the streaming loader's rate
(documents/s and sequences/s, with its configured workers) next to the rate at which training steps consume them.

    python benchmarks/loader_throughput.py [--config configs/tiny-cpu.yaml] [--batches 40] [--steps 8] [--key=value]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from megafusion.config import load_config  # noqa: E402
from megafusion.data_pipeline.loader import LatentSequenceStream, build_loader  # noqa: E402


def loader_rate(cfg, ctx, model, batches: int) -> tuple[float, float]:
    stream = LatentSequenceStream(ctx.shards, ctx.tokenizer, cfg.image.tokens_per_image, model.boi_id, model.eoi_id,
                                  cfg.data)
    it = iter(build_loader(stream, cfg.train.micro_batch_size))
    next(it)  # worker start-up and shuffle-buffer fill are paid once per run, not per step
    docs = seqs = 0
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        docs += len(batch["keys"])
        seqs += batch["input_ids"].shape[0]
    elapsed = time.perf_counter() - start
    return docs / elapsed, seqs / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--steps", type=int, default=8)
    args, overrides = p.parse_known_args()
    cfg = load_config(args.config, overrides + ["--train.output_dir=/tmp/megafusion-loader-bench"])

    import torch

    from megafusion.training.run_setup import setup_training

    run = setup_training(cfg)
    loader_docs, loader_seqs = loader_rate(cfg, run.ctx, run.model, args.batches)

    stream = LatentSequenceStream(run.ctx.shards, run.ctx.tokenizer, cfg.image.tokens_per_image, run.model.boi_id,
                                  run.model.eoi_id, cfg.data)
    batches = [b for b, _ in zip(build_loader(stream, cfg.train.micro_batch_size), range(args.steps + 1), strict=False)]
    generator = torch.Generator().manual_seed(0)
    run.step(batches[0], generator)  # warm-up
    docs = seqs = 0
    start = time.perf_counter()
    for batch in batches[1:]:
        run.step(batch, generator)
        docs += len(batch["keys"])
        seqs += batch["input_ids"].shape[0]
    elapsed = time.perf_counter() - start
    train_docs, train_seqs = docs / elapsed, seqs / elapsed
    print(f"config {args.config}: max_len={cfg.data.max_len}, micro_batch={cfg.train.micro_batch_size}, "
          f"loader workers={cfg.data.num_workers}, torch threads={torch.get_num_threads()}")
    print(f"loader supplies : {loader_docs:10.1f} docs/s  {loader_seqs:8.2f} seqs/s")
    print(f"training uses   : {train_docs:10.1f} docs/s  {train_seqs:8.2f} seqs/s")
    print(f"loader headroom (supply / consumption): {loader_seqs / train_seqs:.1f}x")


if __name__ == "__main__":
    main()
