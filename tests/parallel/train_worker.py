"""Worker for test_equivalence (launched by torchrun): for each case (a layout x a separation), trains a tiny
LlamaFusion for 2 AdamW steps under parallelize_fusion and, in the same process, a plain single-process copy on the
same global batches; compares losses, grad norms and trainable weights, and checks that text weights are
bitwise unchanged. Each data-parallel rank gets its own micro-batch (different image and text-token counts); the
single-process reference runs their concatenation. Rank 0 writes the measured differences as JSON."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from megafusion.model import LlamaFusion
from megafusion.parallel import (
    MeshLayout,
    build_device_mesh,
    build_on_meta,
    clip_grad_norm_,
    dp_mesh,
    dp_sum,
    materialize,
    parallelize_fusion,
)
from tests.distributed import serve_worker_cases
from tests.helpers import TINY_IMAGE, TINY_UNET

STEPS = 2
# The paper's image learning rate; Adam turns fp32 reordering noise into update noise proportional to it.
LR, MAX_NORM, LOSS_WEIGHT = 1e-4, 1.0, 5.0
SEQ = 16
# Rows of SEQ tokens with 4 tokens per image: (leading text, images as (gap text after it)...)
ROW_KINDS = {
    "one_image": (3, [7]),  # 3 text, BOI, 4 image, EOI, 7 text
    "two_images": (0, [2, 2]),  # image first: BOI img EOI, 2 text, BOI img EOI, 2 text
    "text_only": (16, []),
}
# Micro-batch of data-parallel rank r at step s: ROWS[(2 * s + r) % 4]: different image and text counts on every
# rank and step; with 2 dp ranks the second step gives one rank no image at all (its image path is unused).
ROWS = [("one_image", "two_images"), ("text_only", "one_image"), ("two_images", "two_images"),
        ("text_only", "text_only")]


@dataclass
class Case:
    layout: MeshLayout
    separation: str
    base: str
    meta: bool
    checkpointing: bool
    attention: str

    @classmethod
    def parse(cls, spec: str) -> Case:
        """replicate,shard,tp:separation:base_dir[:meta][:ac][:flex|:triton] (attention of the parallel model;
        the reference always runs sdpa)."""
        layout, separation, base, *flags = spec.split(":")
        r, s, t = (int(x) for x in layout.split(","))
        attention = next((f for f in flags if f in ("flex", "triton")), "sdpa")
        return cls(MeshLayout(r, s, t), separation, base, "meta" in flags, "ac" in flags, attention)


def make_row(kind: str, vocab: int, n: int, g: torch.Generator) -> tuple[list[int], list[int]]:
    lead, gaps = ROW_KINDS[kind]
    ids = torch.randint(0, vocab, (lead,), generator=g).tolist()
    mod = [0] * lead
    for gap in gaps:
        ids += [vocab] + [0] * n + [vocab + 1] + torch.randint(0, vocab, (gap,), generator=g).tolist()
        mod += [0] + [1] * n + [0] * (1 + gap)
    assert len(ids) == SEQ, (kind, len(ids))
    return ids, mod


def micro_batch(step: int, dp_rank: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + dp_rank)
    n = TINY_IMAGE.tokens_per_image
    rows = [make_row(kind, vocab, n, g) for kind in ROWS[(2 * step + dp_rank) % len(ROWS)]]
    input_ids = torch.tensor([r[0] for r in rows])
    modality = torch.tensor([r[1] for r in rows])
    num_images = int((modality[:, 1:] > modality[:, :-1]).sum() + modality[:, 0].sum())
    shape = (num_images, TINY_IMAGE.latent_channels, TINY_IMAGE.latent_size, TINY_IMAGE.latent_size)
    latents, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    # A fixed interpolation stands in for the DDPM schedule: equivalence does not depend on it.
    return {"input_ids": input_ids, "modality": modality, "noisy": 0.8 * latents + 0.6 * noise, "noise": noise,
            "timesteps": torch.randint(0, 1000, (num_images,), generator=g)}


def concat(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def targets_of(input_ids: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
    """Next token, or -100 where the next position is an image token or past the end."""
    t = torch.full_like(input_ids, -100)
    t[:, :-1] = input_ids[:, 1:]
    t[:, :-1][modality[:, 1:] == 1] = -100
    return t


def loss_sums(model: LlamaFusion, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(CE sum over text targets, squared-error sum over latent elements, their counts)."""
    out = model(batch["input_ids"], batch["modality"], images=batch["noisy"], timesteps=batch["timesteps"],
                compute_logits=False, lm_targets=targets_of(batch["input_ids"], batch["modality"]))
    ce = F.cross_entropy(out.lm_logits.float(), out.lm_targets, reduction="sum")
    if out.noise_pred is None:
        return ce, ce.new_zeros(()), out.lm_targets.numel(), 0
    mse = F.mse_loss(out.noise_pred.float(), batch["noise"], reduction="sum")
    return ce, mse, out.lm_targets.numel(), batch["noise"].numel()


def freeze_text(model: LlamaFusion) -> None:
    """lr_text = 0: the text group gets requires_grad=False (as the trainer's build_optimizer does)."""
    for name, p in model.named_parameters():
        p.requires_grad_(LlamaFusion.parameter_group(name) == "image")


def optimizer(model: LlamaFusion) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, betas=(0.9, 0.95),
                             eps=1e-8, weight_decay=0.1)


def plain_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def full_of(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def max_rel_difference(model: LlamaFusion, reference: LlamaFusion, value, initial: dict | None = None,
                       skip_zero_init: dict | None = None) -> dict:
    """Worst tensor of `value(param)` over the trainable parameters, as ||parallel - reference|| / ||reference||
    (Frobenius norms), plus the same ratio over all of them as one vector ("all"). With `initial`: of the updates
    value - initial instead. With `skip_zero_init` (the initial weights): tensors that start at zero are left out
    of the per-tensor worst (their weight IS their Adam update, checked as an update)."""
    ref_params = dict(reference.named_parameters())
    worst = {"rel": 0.0, "name": "", "tensors": 0}
    diff_sq = ref_sq = 0.0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = plain_name(name)
        ours, ref = full_of(value(p)), value(ref_params[name])
        if initial is not None:
            ours, ref = ours - initial[name], ref - initial[name]
        diff, norm = (ours - ref).norm().item(), ref.norm().item()
        diff_sq, ref_sq = diff_sq + diff**2, ref_sq + norm**2
        if skip_zero_init is not None and not skip_zero_init[name].any():
            continue
        rel = diff / max(norm, 1e-30)
        worst["tensors"] += 1
        if rel > worst["rel"]:
            worst.update(rel=rel, name=name)
    worst["all"] = (diff_sq / max(ref_sq, 1e-60)) ** 0.5
    return worst


def run_case(case: Case, rank: int) -> dict:
    start = time.perf_counter()
    torch.manual_seed(0)  # U-Nets start from scratch: the same seed gives every rank (and the reference) one init
    reference = LlamaFusion.from_llama(case.base, case.separation, TINY_IMAGE, TINY_UNET)
    freeze_text(reference)
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    trainable = {n: p.requires_grad for n, p in reference.named_parameters()}
    layout = case.layout.resolve(dist.get_world_size(), reference.arch)
    mesh = build_device_mesh(layout, "cpu")
    dp = dp_mesh(mesh)
    dp_rank, dp_size = dp.get_local_rank(), dp.size()
    if case.meta:
        model = build_on_meta(reference.arch, case.separation, TINY_IMAGE, TINY_UNET, attention=case.attention)
        freeze_text(model)
        parallelize_fusion(model, mesh, activation_checkpointing=case.checkpointing)
        materialize(model, reference.state_dict() if rank == 0 else None, "cpu")
    else:
        torch.manual_seed(0)
        model = LlamaFusion.from_llama(case.base, case.separation, TINY_IMAGE, TINY_UNET, attention=case.attention)
        freeze_text(model)
        parallelize_fusion(model, mesh, activation_checkpointing=case.checkpointing)
    requires_grad_kept = all(p.requires_grad == trainable[plain_name(n)] for n, p in model.named_parameters())
    setup_seconds = time.perf_counter() - start

    opt, ref_opt = optimizer(model), optimizer(reference)
    vocab = reference.arch.vocab_size
    losses, ref_losses, norms, ref_norms = [], [], [], []
    for step in range(STEPS):
        # Parallel: this rank's micro-batch, sums normalised by the GLOBAL counts (all-reduced over dp).
        ce, mse, n_text, n_elem = loss_sums(model, micro_batch(step, dp_rank, vocab))
        n_text, n_elem = dp_sum(n_text, mesh), dp_sum(n_elem, mesh)
        loss = ce / n_text + LOSS_WEIGHT * mse / n_elem
        loss.backward()
        norms.append(clip_grad_norm_(model.parameters(), MAX_NORM).item())
        losses.append(dp_sum(loss.detach().double(), mesh).item())

        # Reference: one process, the concatenation of every data-parallel rank's micro-batch.
        batch = concat([micro_batch(step, r, vocab) for r in range(dp_size)])
        ce, mse, n_text, n_elem = loss_sums(reference, batch)
        ref_loss = ce / n_text + LOSS_WEIGHT * mse / n_elem
        ref_loss.backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM).item())
        ref_losses.append(ref_loss.item())
        if step == 0:  # same weights still: the (clipped) gradients themselves must agree
            grad_rel = max_rel_difference(model, reference, lambda p: p.grad)
        for o in (opt, ref_opt):
            o.step()
            o.zero_grad(set_to_none=True)

    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    text_bitwise = all(torch.equal(full_of(p), initial[plain_name(n)]) for n, p in frozen)
    # No gradient and no optimizer state for the frozen set.
    frozen_untouched = all(p.grad is None and p not in opt.state for _, p in frozen) and len(frozen) > 0
    weight_rel = max_rel_difference(model, reference, lambda p: p.detach(), skip_zero_init=initial)
    update_rel = max_rel_difference(model, reference, lambda p: p.detach(), initial)
    rel_loss = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses, strict=True))
    rel_norm = max(abs(a - b) / abs(b) for a, b in zip(norms, ref_norms, strict=True))
    return {"case": f"{layout.dp_replicate}x{layout.dp_shard}x{layout.tp}:{case.separation}"
                    + (":meta" if case.meta else "") + (":ac" if case.checkpointing else "")
                    + (f":{case.attention}" if case.attention != "sdpa" else ""),
            "losses": losses, "ref_losses": ref_losses, "rel_loss": rel_loss, "grad_norms": norms,
            "ref_grad_norms": ref_norms, "rel_grad_norm": rel_norm, "grad_rel": grad_rel, "weight_rel": weight_rel,
            "update_rel": update_rel, "text_bitwise_unchanged": text_bitwise, "frozen_untouched": frozen_untouched,
            "requires_grad_kept": requires_grad_kept, "setup_seconds": setup_seconds,
            "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    serve_worker_cases(lambda spec: run_case(Case.parse(spec), dist.get_rank()))
