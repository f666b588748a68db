"""Worker for test_global_weighting: one optimizer step with gradient accumulation over micro-batches of very
different text-target and image counts, through the trainer's DeepSpeed engine and global normalisation; rank 0
compares the accumulated gradients with a plain single-process autograd reference over the concatenated batch.
Launched by torchrun."""

import argparse
import json
import os

import torch
from deepspeed.utils import safe_get_full_grad

from megafusion.config import load_config
from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.model import LlamaFusion
from megafusion.training.objective import LossNormalizer, TransfusionObjective, count_loss_terms
from megafusion.training.run_setup import setup_training
from megafusion.training.step import global_normalizer

ACCUM = 4


def sample(index: int, boi: int, eoi: int) -> dict:
    """Global micro-batch `index`: 0 to 3 images (16 tokens each) and 4 to 60 text tokens, one row, seeded."""
    g = torch.Generator().manual_seed(1000 + index)
    num_images = index % 4
    text = int(torch.randint(4, 60, (1,), generator=g))
    ids, mod = torch.randint(0, 256, (text,), generator=g).tolist(), [0] * text
    for _ in range(num_images):
        ids += [boi] + [0] * 16 + [eoi] + torch.randint(0, 256, (3,), generator=g).tolist()
        mod += [0] + [1] * 16 + [0] * 4
    ids_t = torch.tensor([ids])
    return {
        "input_ids": ids_t, "modality": torch.tensor([mod]), "doc_ids": torch.zeros_like(ids_t),
        "labels": ids_t.clone(), "latents": torch.randn(num_images, 1, 8, 8, generator=g) if num_images else None,
        "image_first": torch.zeros(num_images, dtype=torch.bool) if num_images else None,
    }


def generator_for(index: int) -> torch.Generator:
    return torch.Generator().manual_seed(777 + index)


def reference_grads(cfg, base, world: int, per_micro_mean: bool) -> dict[str, torch.Tensor]:
    """One process, plain autograd: loss = sum of CE over every text target of the global batch / their number +
    lambda * sum of squared error over every latent element / their number (or, with per_micro_mean, the mean
    of each micro-batch's own mean objective: what a per-micro-batch normalisation optimises)."""
    torch.manual_seed(cfg.train.seed)
    model = LlamaFusion.from_llama(base, cfg.model.separation, cfg.image, cfg.unet)
    for name, p in model.named_parameters():
        p.requires_grad_(LlamaFusion.parameter_group(name) == "image")
    objective = TransfusionObjective(DDPMSchedule(cfg.diffusion), cfg.diffusion.loss_weight)
    batches = [sample(i, model.boi_id, model.eoi_id) for i in range(world * ACCUM)]
    counts = [count_loss_terms(b) for b in batches]  # the whole global batch, counted in this one process
    normalizer = LossNormalizer(sum(c[0] for c in counts), sum(c[1] for c in counts))
    total = 0.0
    for i, b in enumerate(batches):
        out = objective(model, b["input_ids"], b["modality"], latents=b["latents"], image_first=b["image_first"],
                        doc_ids=b["doc_ids"], labels=b["labels"], generator=generator_for(i),
                        normalizer=None if per_micro_mean else normalizer)
        total = total + (out.loss / len(batches) if per_micro_mean else out.loss)
    total.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--zero", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", required=True)
    args = p.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    cfg = load_config("tiny-cpu", [
        f"--train.zero_stage={args.zero}", "--train.micro_batch_size=1", f"--train.grad_accum_steps={ACCUM}",
        "--train.precision=fp32", f"--train.output_dir={args.workdir}",
    ])
    run = setup_training(cfg)
    indices = [run.rank * ACCUM + m for m in range(ACCUM)]
    batches = [sample(i, run.model.boi_id, run.model.eoi_id) for i in indices]
    normalizer = global_normalizer(batches, run.loss_scale)
    for m, (index, batch) in enumerate(zip(indices, batches, strict=True)):
        if m < ACCUM - 1:
            run.step(batch, generator_for(index), normalizer)
    # The last micro-batch closes the accumulation: read the reduced gradients before the optimizer step.
    assert run.step.forward_backward(batches[-1], generator_for(indices[-1]), normalizer) is not None
    grads = {n: safe_get_full_grad(p) for n, p in run.model.named_parameters() if p.requires_grad}
    grads = {n: g.detach().clone() for n, g in grads.items() if g is not None}
    run.engine.step()
    if run.rank != 0:
        return
    counts = [count_loss_terms(sample(i, run.model.boi_id, run.model.eoi_id)) for i in range(world * ACCUM)]
    exact = reference_grads(cfg, run.ctx.base, world, per_micro_mean=False)
    per_micro = reference_grads(cfg, run.ctx.base, world, per_micro_mean=True)

    def max_rel(ref: dict[str, torch.Tensor]) -> float:
        worst = 0.0
        for name, g in grads.items():
            r = ref[name]
            worst = max(worst, float((g - r).abs().max() / r.abs().max().clamp(min=1e-12)))
        return worst

    with open(args.out, "w") as fh:
        json.dump({
            "names": sorted(grads), "reference_names": sorted(exact),
            "max_rel_vs_global_reference": max_rel(exact), "max_rel_vs_per_micro_mean": max_rel(per_micro),
            "text_targets": [c[0] for c in counts], "latent_elements": [c[1] for c in counts],
        }, fh)


if __name__ == "__main__":
    main()
