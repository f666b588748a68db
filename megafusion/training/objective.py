"""L = L_LM + lambda * L_DDPM (Transfusion eq. 4): next-token CE on text, noise-prediction MSE on latents.

The objective reports each term as a SUM with its COUNT (CE summed over the text targets, squared error summed over
the latent elements). With a `LossNormalizer` (what training uses) `loss` is normalised by the GLOBAL counts (all
accumulation micro-batches, all data-parallel ranks): L = sum CE / N_text + lambda * sum SE / N_latent, so a
gradient never depends on how documents happened to pack into micro-batches. Without one, `loss` is this
micro-batch's mean objective (inference-style callers, tests).

With `skip_frozen_rows` the model runs the rows no trainable parameter reaches without autograd
(model/frozen_rows.py) and hands back their loss in reduced form: per row the base vocabulary's log-sum-exp and
target logit (constants) beside the BOI/EOI logits (in the graph when the special head trains). The cross-entropy
over [base vocabulary + BOI/EOI] is then logaddexp(lse_base, lse_special) - target logit: the same value and the
same gradient as over the full logits, without the LM head's backward. When nothing trainable reaches those rows
their loss is a constant and is computed only every `frozen_loss_every`-th call (0 = never), for the log; the loss
is normalised by every target all the same, so gradients never change."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megafusion.config.schema import MegaFusionConfig
from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.model.fusion import LlamaFusion
from megafusion.model.layout import IMAGE, TokenLayout

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossNormalizer:
    """Global denominators of one optimizer step. `scale` undoes the engine's own averaging: DeepSpeed divides the
    loss by the accumulation steps and averages gradients over data-parallel ranks, so it is their product there."""

    num_text_targets: float
    num_latent_elements: float
    scale: float = 1.0

    def loss(self, lm_sum: torch.Tensor, diffusion_sum: torch.Tensor, loss_weight: float) -> torch.Tensor:
        # An empty term (no text targets, or no image, anywhere in the global batch) contributes zero.
        lm = lm_sum / self.num_text_targets if self.num_text_targets else lm_sum * 0.0
        diff = diffusion_sum / self.num_latent_elements if self.num_latent_elements else diffusion_sum * 0.0
        return (lm + loss_weight * diff) * self.scale


def count_loss_terms(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(text targets, latent elements) of a collated micro-batch, before any forward: what the objective will sum
    over. A target counts where the position is a text token with a next-token target (the LM head runs on text
    rows only)."""
    targets = next_token_targets(batch["input_ids"], batch["modality"], batch.get("doc_ids"), batch.get("labels"))
    num_targets = int(((targets != IGNORE_INDEX) & (batch["modality"] != IMAGE)).sum())
    latents = batch.get("latents")
    return num_targets, 0 if latents is None else int(latents.numel())


class LossTerms:
    """Mean views of a result that holds its loss terms as sums with counts."""

    lm_loss_sum: torch.Tensor
    num_text_targets: int
    diffusion_loss_sum: torch.Tensor
    num_latent_elements: int

    @property
    def lm_loss(self) -> torch.Tensor:
        """Mean CE per text target (0 without targets), detached."""
        return mean_of(self.lm_loss_sum, self.num_text_targets).detach()

    @property
    def diffusion_loss(self) -> torch.Tensor:
        """Mean squared error per latent element (0 without images), detached."""
        return mean_of(self.diffusion_loss_sum, self.num_latent_elements).detach()


@dataclass
class LossOutput(LossTerms):
    # The per-micro-batch mean objective (keeps the graph).
    loss: torch.Tensor
    # Sum of the cross-entropy over the text targets, and how many there are (keeps the graph).
    lm_loss_sum: torch.Tensor
    num_text_targets: int
    # Sum of the squared noise-prediction error over every latent element, and how many there are (keeps the graph).
    diffusion_loss_sum: torch.Tensor
    num_latent_elements: int
    num_images: int
    # The batch layout the model ran on (the trainer's FLOP count reads it).
    layout: TokenLayout
    # (B, S) rows run without autograd (None: no split), and how many of num_text_targets lie on them.
    frozen_rows: torch.Tensor | None = None
    num_frozen_lm_rows: int = 0


def mean_of(total: torch.Tensor, count: int) -> torch.Tensor:
    """total / count, or total itself (a zero that keeps the graph) when nothing was counted."""
    return total / count if count else total


def next_token_targets(
    input_ids: torch.Tensor,
    modality: torch.Tensor,
    doc_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Target of position i = token at i+1, or IGNORE_INDEX when i+1 is an image token, starts another packed
    document, is masked in `labels`, or does not exist. BOI/EOI ids (>= vocab) stay targets."""
    src = input_ids if labels is None else labels
    targets = torch.full_like(src, IGNORE_INDEX)
    targets[:, :-1] = src[:, 1:]
    targets[:, :-1][modality[:, 1:] == IMAGE] = IGNORE_INDEX
    if doc_ids is not None:
        targets[:, :-1][doc_ids[:, 1:] != doc_ids[:, :-1]] = IGNORE_INDEX
    return targets


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """The losses are computed in fp32 from bf16 outputs; an fp64 model (exactness tests) keeps fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """`flag` on every rank (one tiny all-reduce when distributed). The split runs every block twice (frozen rows,
    then the rest): where a block's forward gathers its sharded weights collectively (FSDP, ZeRO-3) every
    data-parallel rank must make the same choice, or their collectives stop matching."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() == 1.0)


def weighted_squared_error(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i * sum over image i's latent elements of (pred - target)^2 (DDPMSchedule.loss_weights' w)."""
    per_image = F.mse_loss(pred, target, reduction="none").flatten(1).sum(dim=1)
    return (per_image * weights.to(per_image.dtype)).sum()


def frozen_rows_cross_entropy(reduced: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-row cross-entropy over [base vocabulary + BOI/EOI] from FusionOutput.frozen_lm_logits' (N, 4) columns
    [lse of the base logits, base logit of the target, BOI logit, EOI logit]; exact in value and gradient."""
    lse = torch.logsumexp(reduced[:, [0, 2, 3]], dim=-1)
    special = targets >= vocab_size
    special_target = reduced[:, 2:].gather(1, (targets - vocab_size).clamp(min=0)[:, None]).squeeze(1)
    return lse - torch.where(special, special_target, reduced[:, 1])


class TransfusionObjective:
    def __init__(self, schedule: DDPMSchedule, loss_weight: float, skip_frozen_rows: bool = False,
                 frozen_loss_every: int = 0) -> None:
        """skip_frozen_rows, frozen_loss_every: see the module docstring (`build_objective` takes them from the run
        config, where the skip is on by default)."""
        self.schedule = schedule
        self.loss_weight = loss_weight
        self.skip_frozen_rows = skip_frozen_rows
        self.frozen_loss_every = frozen_loss_every
        self._calls = 0

    def __call__(
        self,
        model: LlamaFusion,
        input_ids: torch.Tensor,
        modality: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        image_first: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        layout: TokenLayout | None = None,
        normalizer: LossNormalizer | None = None,
    ) -> LossOutput:
        """latents: clean (N, C, H, W) VAE latents, one per image; image_first: (N,) bool, caps their noise.
        layout: the batch's TokenLayout when the caller already built it (then modality, image_ids, doc_ids and
        position_ids are not read); built here from them otherwise. normalizer: the global denominators (see the
        module docstring); None = this micro-batch's means."""
        if layout is None:
            layout = TokenLayout.build(input_ids, modality, image_ids, doc_ids, position_ids,
                                       model.image_config.tokens_per_image)
        noisy = timesteps = noise = None
        num_images = 0 if latents is None else latents.shape[0]
        if num_images:
            if image_first is None:
                image_first = torch.zeros(num_images, dtype=torch.bool, device=latents.device)
            timesteps = self.schedule.sample_timesteps(image_first, generator)
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
            noisy = self.schedule.add_noise(latents, noise, timesteps)
        targets = next_token_targets(input_ids, layout.modality, layout.doc_ids, labels)
        self._calls += 1
        log_frozen = self.frozen_loss_every > 0 and self._calls % self.frozen_loss_every == 0
        split = self.skip_frozen_rows and all_ranks_agree(model.frozen_split(input_ids, layout) is not None,
                                                          input_ids.device)
        out = model(
            input_ids, layout.modality, layout.image_ids, layout.doc_ids, layout.position_ids, images=noisy,
            timesteps=timesteps, compute_logits=False, lm_targets=targets, frozen_split=split, frozen_lm=log_frozen,
        )
        num_targets = int(out.lm_targets.numel())
        logits = at_least_fp32(out.lm_logits)
        # sum / count is bitwise torch's mean reduction for CE, in the forward and the backward.
        lm_sum = F.cross_entropy(logits, out.lm_targets, reduction="sum") if num_targets else logits.sum() * 0.0
        # The denominator counts every target, also those of frozen rows whose (constant) loss was not computed.
        all_targets = num_targets
        num_frozen = 0
        if out.frozen_rows is not None:
            all_targets += int(out.frozen_lm_targets.numel())
            if out.frozen_lm_logits is not None:
                num_frozen = int(out.frozen_lm_targets.numel())
                lm_sum = lm_sum + frozen_rows_cross_entropy(out.frozen_lm_logits, out.frozen_lm_targets,
                                                            model.arch.vocab_size).sum()
        lm_loss = mean_of(lm_sum, all_targets)
        num_targets += num_frozen

        num_elements = 0
        if num_images:
            pred = at_least_fp32(out.noise_pred)
            target = at_least_fp32(self.schedule.target(latents, noise, timesteps))
            num_elements = target.numel()
            weights = self.schedule.loss_weights(timesteps)
            if weights is None:
                diffusion_sum = F.mse_loss(pred, target, reduction="sum")
                # torch's own mean reduction for the term that is backpropagated: its backward rounds differently
                # from sum / count, and the per-micro-batch loss must stay bitwise what it was.
                diffusion_loss = F.mse_loss(pred, target)
            else:
                diffusion_sum = weighted_squared_error(pred, target, weights)
                diffusion_loss = diffusion_sum / num_elements
        else:
            diffusion_sum = diffusion_loss = lm_loss.new_zeros(())
        if normalizer is None:
            loss = lm_loss + self.loss_weight * diffusion_loss
        else:
            loss = normalizer.loss(lm_sum, diffusion_sum, self.loss_weight)
        return LossOutput(loss, lm_sum, num_targets, diffusion_sum, num_elements, num_images, layout,
                          out.frozen_rows, num_frozen)


def build_objective(cfg: MegaFusionConfig) -> TransfusionObjective:
    """The run's objective, as its config describes it."""
    return TransfusionObjective(DDPMSchedule(cfg.diffusion), cfg.diffusion.loss_weight,
                                skip_frozen_rows=cfg.train.skip_frozen_rows,
                                frozen_loss_every=cfg.train.frozen_loss_every)
