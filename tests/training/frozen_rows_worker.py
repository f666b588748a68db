"""Worker for test_frozen_rows_distributed (torchrun, 2 processes, gloo): FSDP2 over dp2 with the frozen-row split
on. Round 0: rank 0's micro-batch has frozen rows, rank 1's has none (the ranks must agree to run the full
computation, or FSDP's all-gathers stop matching and the run hangs); round 1: both have some (both split). Each
round's gradients are compared with one process running the full computation over both micro-batches."""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.model import LlamaFusion
from megafusion.parallel import MeshLayout, build_device_mesh, parallelize_fusion
from megafusion.training.objective import LossNormalizer, TransfusionObjective, count_loss_terms
from tests.helpers import TINY_IMAGE, TINY_UNET


def batch(vocab: int, caption_first: bool, seed: int) -> dict[str, torch.Tensor]:
    """One row: caption first (3 frozen rows) or image first (none), 4 image tokens."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, vocab, (4,), generator=g).tolist()
    image = [vocab, 0, 0, 0, 0, vocab + 1]
    ids = text[:3] + image + text[3:] if caption_first else image + text
    input_ids = torch.tensor([ids])
    modality = torch.zeros_like(input_ids)
    start = ids.index(vocab) + 1
    modality[0, start : start + 4] = 1
    return {"input_ids": input_ids, "modality": modality, "doc_ids": torch.zeros_like(input_ids),
            "labels": input_ids.clone(), "latents": torch.randn(1, 4, 4, 4, generator=g),
            "image_first": torch.tensor([not caption_first])}


def losses(model: LlamaFusion, objective: TransfusionObjective, batches: list[dict], normalizer: LossNormalizer,
           seeds: list[int]) -> tuple[torch.Tensor, list[bool]]:
    total, split = 0.0, []
    for b, seed in zip(batches, seeds, strict=True):
        out = objective(model, b["input_ids"], b["modality"], latents=b["latents"], image_first=b["image_first"],
                        doc_ids=b["doc_ids"], labels=b["labels"], generator=torch.Generator().manual_seed(seed),
                        normalizer=normalizer)
        total = total + out.loss
        split.append(out.frozen_rows is not None)
    return total, split


def frozen_text(model: LlamaFusion) -> LlamaFusion:
    for name, p in model.named_parameters():
        p.requires_grad_(LlamaFusion.parameter_group(name) == "image")
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    reference = frozen_text(LlamaFusion.from_llama(args.base, "deep", TINY_IMAGE, TINY_UNET))
    torch.manual_seed(0)
    model = frozen_text(LlamaFusion.from_llama(args.base, "deep", TINY_IMAGE, TINY_UNET))
    parallelize_fusion(model, build_device_mesh(MeshLayout(1, 2, 1).resolve(2, model.arch), "cpu"))
    vocab = model.arch.vocab_size
    full = TransfusionObjective(DDPMSchedule(), 5.0)
    skip = TransfusionObjective(DDPMSchedule(), 5.0, skip_frozen_rows=True)
    report = {}
    for round_, caption_first in enumerate([(True, False), (True, True)]):
        batches = [batch(vocab, first, 10 * round_ + r) for r, first in enumerate(caption_first)]
        counts = [count_loss_terms(b) for b in batches]
        normalizer = LossNormalizer(sum(c[0] for c in counts), sum(c[1] for c in counts))
        seeds = [100 * round_ + r for r in range(2)]
        reference.zero_grad(set_to_none=True)
        losses(reference, full, batches, normalizer, seeds)[0].backward()
        model.zero_grad(set_to_none=True)
        loss, split = losses(model, skip, batches[rank : rank + 1], normalizer, seeds[rank : rank + 1])
        loss.backward()
        worst = 0.0
        for (name, p), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
            if p.grad is None:
                assert ref.grad is None, name
                continue
            grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
            worst = max(worst, float((grad - ref.grad).norm() / ref.grad.norm().clamp(min=1e-30)))
        splits = [None, None]
        dist.all_gather_object(splits, split[0])
        report[f"round{round_}"] = {"split": splits, "worst_rel": worst}
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
