"""Model FLOPs of one LlamaFusion training step (forward + backward) on a concrete batch layout.

These are *model* FLOPs: the multiply-adds the model needs, not what a particular kernel happens to execute. They
are what MFU divides by the hardware peak. The rules:

* A matmul of (m x k) by (k x n) is 2*m*k*n FLOPs. Bias adds are not counted.
* Routed linears (`Routed` in `model/routing.py`) count only the rows of their own modality: text rows through the
  `text` set, image rows through the `image` set; a `shared` set (separation `none` / `ffn`) sees every row. So a
  deep-separated model costs the same per token as the dense base model even though it holds two parameter sets.
* Backward of a linear or convolution = (weight grad, 1x forward, if its weight is trainable) + (input grad, 1x
  forward, if a gradient must flow into its input). Hence trainable = 2x forward, frozen = 1x or 0. Which side of
  that holds, per part:

  - image set (Q/K/V, O, FFN): trainable, and the trainable U-Net down lies below every layer: always 2x;
  - text set: 2x if `text_trainable`; frozen: 1x if `text_needs_input_grad`, else 0;
  - shared set: belongs to the text group (2x if `text_trainable`); frozen: 1x over *all* rows when image rows are
    present or `text_needs_input_grad`, because it is one matmul over all rows and autograd computes the input
    gradient of the whole tensor as soon as any row of it needs one;
  - main LM head (base vocabulary, runs on `num_lm_rows` rows): like the text set (it is the text group's, tied or
    not);
  - special BOI/EOI head (2 rows, image group): weight grad always; input grad only if `text_trainable` or
    `text_needs_input_grad` (otherwise the text hidden states carry no gradient);
  - U-Net down/up (all trainable): every conv/linear gets its weight grad; the input grad is counted exactly where
    autograd computes one, which leaves out the two layers fed by non-differentiable inputs, `conv_in` (noisy
    latents) and each time embedding's `linear_1` (sinusoidal features of t): those backward at 1x, the rest at 2x.
* Attention (QK^T and AV) counts only the (query, key) pairs the hybrid mask allows (the number of True entries of
  `HybridMask(layout).dense()`, counted in O(S log S) from the same rule, `hybrid_allowed` of
  `kernels/mask_rule.py`), even though the SDPA reference computes the full square: per layer
  num_heads * (2*pairs*head_dim + 2*pairs*head_dim) forward. Grouped-query attention changes the K/V projections,
  not this. Backward = 2x forward (dS, dP -> dQ, dK, and dV: four matmuls of the same size, no recompute counted)
  whenever gradients flow through attention: image rows present, `text_trainable` or `text_needs_input_grad`.
* U-Net convolutions: 2 * Cin/groups * Cout * kh * kw per output position (Conv2d; Hout*Wout positions per image)
  or per *input* position (ConvTranspose2d; each input pixel scatters a full kernel), i.e. 2 * positions *
  weight.numel(); linear layers inside the U-Net (timestep embedding, per-block time projections) count as matmuls
  with one row per image. They are found by running the U-Net on the meta device (no memory, no compute) with
  forward hooks, so the count follows the real module tree; an unknown parametrised module raises instead of being
  silently left out.
* Rows run without autograd (`frozen`, the mask of model/frozen_rows.py that the objective reports when the text
  path is frozen and `train.skip_frozen_rows` is on): forward only. Their text/shared linears, their attention
  queries and their LM head get no backward at all; their BOI/EOI logits keep the special head's weight gradient
  (when it trains), not its input gradient. `frozen_lm_rows` of the `num_lm_rows` rows are such rows (0 when their
  LM head was skipped: then they are not among `num_lm_rows` either). The padding the split adds to make its two
  passes rectangular is work the model does not need and is not counted.
* Not counted: norms (RMSNorm, GroupNorm), activations, softmax, RoPE, residual adds, the loss, embedding lookups,
  the sinusoidal timestep features, routing gathers, the optimizer step. They are memory-bound and small next to the
  matmuls, and the usual MFU convention leaves them out too.

`text_needs_input_grad` is the caller's statement of whether gradients flow through the text rows;
`infer_text_needs_input_grad` says what autograd actually does for a batch, and `num_lm_rows` counts the rows
the objective runs the LM head on. `model_flops_per_token_dense` is the
classic 6N estimate for the dense base model, kept only to compare against (docs, sanity checks).
"""

from __future__ import annotations

import functools
from dataclasses import astuple, dataclass, field

import torch
from torch import nn

from megafusion.kernels.mask_rule import hybrid_allowed
from megafusion.model.arch import LlamaArch
from megafusion.model.args import ImageConfig, UNetConfig
from megafusion.model.fusion import NUM_SPECIAL_TOKENS, LlamaFusion
from megafusion.model.layers import RMSNorm
from megafusion.model.layout import IMAGE, TokenLayout
from megafusion.model.routing import Routed
from megafusion.model.unet import UNetDown, UNetUp
from megafusion.training.objective import IGNORE_INDEX

# Parametrised leaf modules whose FLOPs the rules deliberately ignore (elementwise, memory-bound).
_IGNORED_LEAVES = (RMSNorm, nn.GroupNorm, nn.LayerNorm)
_MATMUL_LEAVES = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


@dataclass
class StepFlops:
    forward: int
    backward: int
    # "<part>.forward" / "<part>.backward" -> FLOPs; the forward entries sum to `forward`, the backward ones to
    # `backward`. Parts: linear.text, linear.image, linear.shared, attention, lm_head, special_head, unet_down,
    # unet_up (a part absent from the model or the batch is reported as 0).
    breakdown: dict[str, int]
    total: int = field(init=False)

    def __post_init__(self) -> None:
        self.total = self.forward + self.backward


def _backward(forward: int, weight_grad: bool, input_grad: bool) -> int:
    return forward * (int(weight_grad) + int(input_grad))


def _check_leaves(module: nn.Module, where: str) -> None:
    """Refuse to count a module tree holding parametrised layers the rules do not know (they would be missed)."""
    for name, m in module.named_modules():
        if isinstance(m, _MATMUL_LEAVES + _IGNORED_LEAVES):
            continue
        if next(m.parameters(recurse=False), None) is not None:
            raise NotImplementedError(f"flops: no FLOP rule for {type(m).__name__} at {where}.{name}")


def _linear_flops_per_row(module: nn.Module, where: str) -> int:
    """Forward FLOPs of one row through every nn.Linear of `module` (in/out features, so ZeRO-3's empty
    partitioned parameters do not matter)."""
    _check_leaves(module, where)
    if any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in module.modules()):
        raise NotImplementedError(f"flops: convolution inside the routed module {where}")
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _rank_in_group(*keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For flat 1-D keys: each element's 0-based rank among the elements with equal keys (in flat order) and the
    size of its group."""
    group = torch.zeros_like(keys[0])
    for key in keys:  # mixed-radix combination of dense per-key codes (1-D unique is far faster than dim=1)
        values, code = torch.unique(key, return_inverse=True)
        group = group * values.numel() + code
    _, group = torch.unique(group, return_inverse=True)  # dense again, so bincount stays small
    order = torch.argsort(group, stable=True)  # stable: ranks follow the sequence order
    sorted_group = group[order]
    idx = torch.arange(group.numel(), device=group.device)
    starts = torch.ones_like(sorted_group, dtype=torch.bool)
    starts[1:] = sorted_group[1:] != sorted_group[:-1]
    rank_sorted = idx - torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=0).values
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank, torch.bincount(group)[group]


def _attention_pairs(layout: TokenLayout) -> torch.Tensor:
    """Allowed (query, key) pairs of the hybrid mask per query (B*S,).

    The rule is `hybrid_allowed` (same document AND (key <= query OR same image)); this counts it per query in
    O(S log S) rather than by summing `HybridMask(layout).dense()`, which takes about a second per 4096-token row
    here. Query i sees every earlier-or-equal key of its (row, document), plus, inside an image, the later keys of
    the same (row, document, image). `_check_pair_count_against_rule` holds the two together."""
    _check_pair_count_against_rule()
    return _pairs_per_query(layout)


def _count_pairs(layout: TokenLayout) -> int:
    return int(_pairs_per_query(layout).sum())


def _pairs_per_query(layout: TokenLayout) -> torch.Tensor:
    """(B*S,) number of keys each query may attend to."""
    batch, seq = layout.modality.shape
    row = torch.arange(batch, device=layout.modality.device)[:, None].expand(batch, seq).reshape(-1)
    doc, img = layout.doc_ids.reshape(-1), layout.image_ids.reshape(-1)
    rank_doc, _ = _rank_in_group(row, doc)
    rank_img, size_img = _rank_in_group(row, doc, img)
    later_same_image = torch.where(img >= 0, size_img - 1 - rank_img, torch.zeros_like(rank_img))
    return rank_doc + 1 + later_same_image


@functools.cache
def _check_pair_count_against_rule() -> None:
    """Once per process: the closed form must agree with the mask rule itself on a small layout with every case
    (packed documents, text between images, two adjacent images, a text-only row), so a change of the rule
    cannot leave the FLOP count behind unnoticed."""
    t, i = 0, IMAGE
    modality = torch.tensor([[t, t, i, i, t, i, i, i, i, t, t, i, i, t], [t] * 14])
    doc_ids = torch.tensor([[0] * 7 + [1] * 7, [0] * 5 + [1] * 9])
    layout = TokenLayout.build(torch.zeros_like(modality), modality, doc_ids=doc_ids, tokens_per_image=2)
    idx = torch.arange(modality.shape[1])
    dense = sum(
        int(hybrid_allowed(idx[:, None], idx[None, :], doc[:, None], doc[None, :], img[:, None], img[None, :]).sum())
        for doc, img in zip(layout.doc_ids, layout.image_ids, strict=True)
    )
    if _count_pairs(layout) != dense:
        raise RuntimeError("flops: the attention pair count no longer follows kernels/mask_rule.py's rule")


@dataclass(frozen=True)
class _UNetImageFlops:
    down_forward: int
    down_backward: int
    up_forward: int
    up_backward: int
    # (name, class name) of every module the counts walked, to check them against the model's own U-Nets.
    down_tree: tuple[tuple[str, str], ...]
    up_tree: tuple[tuple[str, str], ...]


def _module_tree(module: nn.Module) -> tuple[tuple[str, str], ...]:
    return tuple((name, type(m).__name__) for name, m in module.named_modules())


@functools.lru_cache(maxsize=32)
def _unet_flops_per_image(image_key: tuple, unet_key: tuple, hidden: int, eps: float) -> _UNetImageFlops:
    """FLOPs of the U-Net down and up for ONE image, from a meta-device forward with hooks on every matmul layer.
    Linear in the number of images (one row / one image per sample), so the caller multiplies."""
    image, unet = ImageConfig(*image_key), UNetConfig(*unet_key)
    with torch.device("meta"):
        down, up = UNetDown(image, unet, hidden), UNetUp(image, unet, hidden, eps)
    counts: dict[str, list[int]] = {"down": [0, 0], "up": [0, 0]}

    def hook(which: str):
        def record(m: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0]
            if isinstance(m, nn.ConvTranspose2d):
                positions = x.numel() // m.in_channels
            elif isinstance(m, nn.Conv2d):
                positions = output.numel() // m.out_channels
            else:
                positions = output.numel() // m.out_features
            fwd = 2 * positions * m.weight.numel()
            counts[which][0] += fwd
            counts[which][1] += _backward(fwd, m.weight.requires_grad, x.requires_grad)

        return record

    for which, net in (("down", down), ("up", up)):
        _check_leaves(net, f"unet_{which}")
        for m in net.modules():
            if isinstance(m, _MATMUL_LEAVES):
                m.register_forward_hook(hook(which))
    size = image.latent_size
    # requires_grad on meta tensors propagates like on real ones, so the hooks see where autograd needs input
    # grads: not for the noisy latents, yes for the transformer's image states and the down->up skip.
    with torch.enable_grad():
        latents = torch.empty(1, image.latent_channels, size, size, device="meta")
        t = torch.zeros(1, dtype=torch.long, device="meta")
        tokens, skip = down(latents, t)
        up(tokens.detach().requires_grad_(True), t, skip)
    return _UNetImageFlops(*counts["down"], *counts["up"], _module_tree(down), _module_tree(up))


def count_step_flops(
    model: LlamaFusion,
    layout: TokenLayout,
    num_lm_rows: int,
    text_trainable: bool,
    text_needs_input_grad: bool,
    frozen: torch.Tensor | None = None,
    frozen_lm_rows: int = 0,
) -> StepFlops:
    """FLOPs of one forward + backward of `model` on a batch with this `layout`, the LM head run on `num_lm_rows`
    text rows (rows with a target, as TransfusionObjective does), `frozen_lm_rows` of them among the (B, S) rows
    `frozen` that ran without autograd. Rules: see the module docstring."""
    if not isinstance(model, LlamaFusion) and isinstance(getattr(model, "module", None), LlamaFusion):
        model = model.module  # a DeepSpeed engine / DDP wrapper
    arch = model.arch
    num_rows = layout.modality.numel()
    num_image = int((layout.modality == IMAGE).sum())
    num_text = num_rows - num_image
    if not 0 <= num_lm_rows <= num_text:
        raise ValueError(f"num_lm_rows={num_lm_rows} must lie in [0, {num_text}] (the batch's text rows)")
    num_frozen = 0 if frozen is None else int(frozen.sum())
    if num_frozen and (text_trainable or bool((frozen & (layout.modality == IMAGE)).any())):
        raise ValueError("frozen rows are text rows of a model whose text path is frozen")
    if not 0 <= frozen_lm_rows <= min(num_frozen, num_lm_rows):
        raise ValueError(f"frozen_lm_rows={frozen_lm_rows} must lie in [0, {min(num_frozen, num_lm_rows)}]")
    text_grad = text_trainable or text_needs_input_grad
    special_trainable = model.special_head.requires_grad
    fwd: dict[str, int] = dict.fromkeys(
        ("linear.text", "linear.image", "linear.shared", "attention", "lm_head", "special_head", "unet_down",
         "unet_up"), 0)
    bwd = dict(fwd)

    # Transformer layers: every Routed module, text / image / shared set on its own rows.
    for i, layer in enumerate(model.layers):
        for name, routed in layer.named_modules():
            if not isinstance(routed, Routed):
                continue
            where = f"layers.{i}.{name}"
            if routed.separate:
                per_row = _linear_flops_per_row(routed.text, where + ".text")
                f_image = num_image * _linear_flops_per_row(routed.image, where + ".image")
                fwd["linear.text"] += num_text * per_row
                bwd["linear.text"] += _backward((num_text - num_frozen) * per_row, text_trainable, text_grad)
                fwd["linear.image"] += f_image
                bwd["linear.image"] += _backward(f_image, True, True)
            else:
                per_row = _linear_flops_per_row(routed.shared, where + ".shared")
                fwd["linear.shared"] += num_rows * per_row
                bwd["linear.shared"] += _backward((num_rows - num_frozen) * per_row, text_trainable,
                                                  text_grad or num_image > 0)

    pairs_per_query = _attention_pairs(layout)
    pairs = int(pairs_per_query.sum())
    learning_pairs = pairs - (int(pairs_per_query[frozen.reshape(-1)].sum()) if num_frozen else 0)

    def attention_flops(num_pairs: int) -> int:
        return len(model.layers) * arch.num_heads * (2 * num_pairs * arch.head_dim + 2 * num_pairs * arch.head_dim)

    fwd["attention"] = attention_flops(pairs)
    bwd["attention"] = 2 * attention_flops(learning_pairs) if (text_grad or num_image > 0) else 0

    def per_lm_row(width: int) -> int:
        return 2 * arch.hidden_size * width

    learning_lm_rows = num_lm_rows - frozen_lm_rows
    fwd["lm_head"] = num_lm_rows * per_lm_row(arch.vocab_size)
    bwd["lm_head"] = _backward(learning_lm_rows * per_lm_row(arch.vocab_size), text_trainable, text_grad)
    special = per_lm_row(NUM_SPECIAL_TOKENS)
    fwd["special_head"] = num_lm_rows * special
    bwd["special_head"] = (_backward(learning_lm_rows * special, special_trainable, text_grad)
                           + _backward(frozen_lm_rows * special, special_trainable, False))

    tokens_per_image = model.image_config.tokens_per_image
    if num_image:
        if num_image % tokens_per_image:
            raise ValueError(f"{num_image} image rows is not a whole number of {tokens_per_image}-token images")
        per_image = _unet_flops_per_image(
            astuple(model.image_config), astuple(model.unet_config), arch.hidden_size, arch.rms_norm_eps
        )
        # The counted U-Nets are rebuilt from the config: make sure that still describes the model's own modules.
        for name, tree in (("unet_down", per_image.down_tree), ("unet_up", per_image.up_tree)):
            if _module_tree(getattr(model, name)) != tree:
                raise NotImplementedError(f"flops: model.{name} is not the module tree its config describes")
        n = num_image // tokens_per_image
        fwd["unet_down"], bwd["unet_down"] = n * per_image.down_forward, n * per_image.down_backward
        fwd["unet_up"], bwd["unet_up"] = n * per_image.up_forward, n * per_image.up_backward

    breakdown = {f"{k}.forward": v for k, v in fwd.items()} | {f"{k}.backward": v for k, v in bwd.items()}
    return StepFlops(forward=sum(fwd.values()), backward=sum(bwd.values()), breakdown=breakdown)


def num_lm_rows(targets: torch.Tensor, modality: torch.Tensor) -> int:
    """Rows the LM head runs on in TransfusionObjective: text rows with a next-token target. (An image's last
    token has the following EOI as its shifted target, but image rows never reach the LM head.)"""
    return int(((targets != IGNORE_INDEX) & (modality != IMAGE)).sum())


def infer_text_needs_input_grad(model: LlamaFusion, layout: TokenLayout, input_ids: torch.Tensor,
                                text_trainable: bool) -> bool:
    """What autograd does: text-row activations carry a gradient when the text set trains, when the batch holds
    image rows (text and image rows are concatenated into one tensor before the first layer, and text attends to
    images), or when it holds BOI/EOI tokens (their embeddings are trainable and are merged into the text rows'
    embedding tensor)."""
    if not isinstance(model, LlamaFusion) and isinstance(getattr(model, "module", None), LlamaFusion):
        model = model.module
    if text_trainable or layout.has_images:
        return True
    text_ids = input_ids[layout.modality != IMAGE]
    return bool((text_ids >= model.arch.vocab_size).any())


def model_flops_per_token_dense(arch: LlamaArch) -> int:
    """The classic 6N estimate for the dense base Llama (2N forward + 4N backward per token, every weight
    trainable), N = the layers' matmul weights + the LM head; embeddings lookups and attention scores left out.
    Only for comparison: a deep-separated LlamaFusion costs the same per token, but its text set is frozen and its
    attention is masked, which `count_step_flops` accounts for and this does not."""
    d, q_dim, kv_dim = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    per_layer = d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * arch.intermediate_size
    return 6 * (arch.num_layers * per_layer + d * arch.vocab_size)
