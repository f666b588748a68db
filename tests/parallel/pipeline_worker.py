"""Worker for test_pipeline (launched by torchrun): for each case (pp x dp_replicate x dp_shard x tp, a schedule, a
micro-batch count), trains a tiny LlamaFusion for 2 AdamW steps through megafusion.parallel.pipeline and, in the
same process, a plain single-process copy on the same global batch (every data-parallel rank's micro-batches
concatenated); compares losses, grad norms and every trainable weight of this rank's stages, and checks the text
weights bitwise. Micro-batches differ in image count (0-4) and text-token count. Rank 0 writes JSON."""

from __future__ import annotations

import time
from dataclasses import replace

import torch
import torch.distributed as dist

from megafusion.model import LlamaFusion
from megafusion.parallel import MeshLayout, build_on_meta, dp_mesh
from megafusion.parallel.pipeline import (
    PipelineRunner,
    build_pipeline_mesh,
    build_stages,
    load_stage_weights,
    parallelize_stage,
    pipeline_clip_grad_norm_,
    pp_mesh,
)
from megafusion.parallel.pipeline_split import max_images_per_row, plan_pipeline
from megafusion.training.objective import LossNormalizer
from tests.distributed import serve_worker_cases
from tests.helpers import TINY_IMAGE, TINY_UNET
from tests.parallel.train_worker import (
    LOSS_WEIGHT,
    MAX_NORM,
    SEQ,
    STEPS,
    concat,
    freeze_text,
    full_of,
    loss_sums,
    micro_batch,
    optimizer,
    plain_name,
    targets_of,
)


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat((t, t.new_zeros(rows - t.shape[0], *t.shape[1:])))


def stacked(batches: list[dict[str, torch.Tensor]], max_images: int) -> dict[str, torch.Tensor]:
    """The schedule's whole-step inputs: rows concatenated, images padded to max_images per micro-batch."""
    out = {"input_ids": torch.cat([b["input_ids"] for b in batches]),
           "modality": torch.cat([b["modality"] for b in batches]),
           "targets": torch.cat([targets_of(b["input_ids"], b["modality"]) for b in batches])}
    out["doc_ids"] = torch.zeros_like(out["modality"])
    for key in ("noisy", "noise", "timesteps"):
        out[key] = torch.cat([pad_rows(b[key], max_images) for b in batches])
    # Uniform weighting (the reference's plain MSE): real images weigh 1, padding 0.
    out["image_weights"] = torch.cat([pad_rows(torch.ones(b["noise"].shape[0]), max_images) for b in batches])
    return out


def counts(batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    text = sum(int(((targets_of(b["input_ids"], b["modality"]) != -100) & (b["modality"] == 0)).sum())
               for b in batches)
    return float(text), float(sum(b["noise"].numel() for b in batches))


def run_case(spec: str) -> dict:
    """pp,replicate,shard,tp:schedule:microbatches:base[:ac][:noskip]"""
    start = time.perf_counter()
    layout_s, schedule, m, base, *flags = spec.split(":")
    pp, r, s, t = (int(x) for x in layout_s.split(","))
    m = int(m)
    torch.manual_seed(0)
    # noskip: a U-Net without the down->up skip; the stages still carry the features, which then get zero grads.
    unet = replace(TINY_UNET, skip="noskip" not in flags)
    reference = LlamaFusion.from_llama(base, "deep", TINY_IMAGE, unet)
    freeze_text(reference)
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    plan = plan_pipeline(pp=pp, schedule=schedule, microbatches=m, pp_layers=[], num_layers=reference.arch.num_layers,
                         grad_accum_steps=m, engine="torch")
    layout = MeshLayout(r, s, t).resolve(dist.get_world_size() // pp, reference.arch)
    mesh = build_pipeline_mesh(pp, layout, "cpu")
    dp = dp_mesh(mesh)
    dp_rank, dp_size = dp.get_local_rank(), dp.size()
    rows = 2
    max_images = rows * max_images_per_row(SEQ, TINY_IMAGE.tokens_per_image)
    meta_model = build_on_meta(reference.arch, "deep", TINY_IMAGE, unet)
    freeze_text(meta_model)
    stages = build_stages(meta_model, plan, pp_mesh(mesh).get_local_rank(), max_images)
    full = reference.state_dict()
    for stage in stages:
        parallelize_stage(stage, mesh, activation_checkpointing="ac" in flags)
        load_stage_weights(stage, full)
    params = [p for stage in stages for p in stage.parameters()]
    runner = PipelineRunner(plan, stages, mesh)
    setup_seconds = time.perf_counter() - start

    opt, ref_opt = optimizer(torch.nn.ModuleList(stages)), optimizer(reference)
    vocab = reference.arch.vocab_size
    losses, ref_losses, norms, ref_norms, images_per_mb = [], [], [], [], []
    for step in range(STEPS):
        # Micro-batch j of data-parallel rank d (row kinds cycle through all four with j): every rank draws the
        # whole set and takes its own.
        every = [[micro_batch(step * m + j, d + j, vocab) for j in range(m)] for d in range(dp_size)]
        mine = every[dp_rank]
        images_per_mb += [b["noise"].shape[0] for b in mine]
        n_text, n_elem = counts([b for bs in every for b in bs])
        normalizer = LossNormalizer(n_text, n_elem)
        x = stacked(mine, max_images)
        sums = runner.step(x["input_ids"], x["noisy"], x, normalizer, LOSS_WEIGHT)
        loss = (sums[:, 0].sum() / n_text + LOSS_WEIGHT * sums[:, 1].sum() / n_elem).reshape(1)
        if dp_size > 1:
            dist.all_reduce(loss, group=dp.get_group())
        losses.append(loss.item())
        norms.append(pipeline_clip_grad_norm_(params, MAX_NORM, mesh).item())

        ce, mse, nt, ne = loss_sums(reference, concat([b for bs in every for b in bs]))
        assert (nt, ne) == (n_text, n_elem), ((nt, ne), (n_text, n_elem))
        ref_loss = ce / nt + LOSS_WEIGHT * mse / ne
        ref_loss.backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM).item())
        ref_losses.append(ref_loss.item())
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad(set_to_none=True)

    ref_params = dict(reference.named_parameters())
    worst, worst_name, text_bitwise, frozen, trainable = 0.0, "", True, 0, 0
    for stage in stages:
        for name, p in stage.named_parameters():
            name = plain_name(name)
            value = full_of(p.detach())
            if not p.requires_grad:
                frozen += 1
                text_bitwise &= torch.equal(value, initial[name]) and p.grad is None and p not in opt.state
                continue
            trainable += 1
            ref = ref_params[name].detach()
            rel = ((value - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            if rel > worst:
                worst, worst_name = rel, name
    # Every rank checked its own stages: the run's worst is the worst over all ranks.
    flags_t = torch.tensor([worst, float(not text_bitwise), -float(trainable > 0 and frozen > 0)], dtype=torch.float64)
    dist.all_reduce(flags_t, op=dist.ReduceOp.MAX)
    rel_loss = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
    rel_norm = max(abs(a - b) / abs(b) for a, b in zip(norms, ref_norms, strict=True))
    return {"case": spec.split(":" + base)[0] + ("".join(f":{f}" for f in flags)), "losses": losses,
            "ref_losses": ref_losses, "rel_loss": rel_loss, "rel_grad_norm": rel_norm,
            "weight_rel": flags_t[0].item(), "worst_rank0_tensor": worst_name,
            "text_bitwise_unchanged": flags_t[1].item() == 0.0, "every_rank_has_both": flags_t[2].item() == -1.0,
            "images_per_microbatch": images_per_mb, "stage_layers": [list(x) for x in plan.stage_layers],
            "setup_seconds": setup_seconds, "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    serve_worker_cases(run_case)
