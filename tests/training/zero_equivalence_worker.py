"""Worker for test_trainer: trains the tiny config for a few steps on fixed global batches under a given ZeRO stage
and world size, with the trainer's global loss normalisation, and writes the per-step global loss (rank 0).
Launched by torchrun."""

import argparse
import json

import deepspeed
import torch
import torch.distributed as dist

from megafusion.config import load_config
from megafusion.model import LlamaFusion
from megafusion.training.run_setup import setup_training
from megafusion.training.step import global_normalizer

STEPS, GLOBAL_BATCH = 4, 2


def sample(step: int, index: int, vocab: int, boi: int, eoi: int) -> dict:
    """Global sample `index` of `step`: caption, BOI, one 1x8x8 image (16 tokens), EOI, text; fully seeded."""
    g = torch.Generator().manual_seed(10_000 * step + index)
    ids = torch.randint(0, 256, (1, 30), generator=g)
    ids[0, 6], ids[0, 23] = boi, eoi
    modality = torch.zeros_like(ids)
    modality[0, 7:23] = 1
    return {
        "input_ids": ids, "modality": modality, "doc_ids": torch.zeros_like(ids), "labels": ids.clone(),
        "latents": torch.randn(1, 1, 8, 8, generator=g), "image_first": torch.tensor([index % 2 == 1]),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--zero", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", required=True)
    args = p.parse_args()
    world = int(__import__("os").environ["WORLD_SIZE"])
    accum = GLOBAL_BATCH // world
    cfg = load_config("configs/tiny-cpu.yaml", [
        f"--train.zero_stage={args.zero}", f"--train.deepspeed_config=configs/deepspeed/zero{args.zero}.json",
        "--train.micro_batch_size=1", f"--train.grad_accum_steps={accum}",
        "--train.precision=fp32", f"--train.output_dir={args.workdir}",
    ])
    run = setup_training(cfg)
    losses, grad_norms = [], []
    for step in range(STEPS):
        total = 0.0
        indices = [run.rank * accum + micro for micro in range(accum)]
        batches = [sample(step, i, run.model.arch.vocab_size, run.model.boi_id, run.model.eoi_id) for i in indices]
        normalizer = global_normalizer(batches, run.loss_scale)
        for index, batch in zip(indices, batches, strict=True):
            result = run.step(batch, torch.Generator().manual_seed(777 + 31 * step + index), normalizer)
            total += result.loss.item() / run.loss_scale  # this micro-batch's share of the global loss
        t = torch.tensor([total], dtype=torch.float64)
        dist.all_reduce(t)
        losses.append(t.item())
        grad_norms.append(run.engine.get_global_grad_norm())

    base = LlamaFusion.from_llama(run.ctx.base, cfg.model.separation, cfg.image, cfg.unet)
    reference = dict(base.named_parameters())
    unchanged = True
    for name, param in run.model.named_parameters():
        if LlamaFusion.parameter_group(name) != "text":
            continue
        with deepspeed.zero.GatheredParameters([param], enabled=args.zero == 3):
            unchanged &= torch.equal(param.detach().cpu(), reference[name].detach())
    if run.rank == 0:
        with open(args.out, "w") as fh:
            json.dump({"losses": losses, "grad_norms": [None if n is None else float(n) for n in grad_norms],
                       "text_unchanged": bool(unchanged)}, fh)


if __name__ == "__main__":
    main()
