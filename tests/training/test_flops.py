"""FLOP counter: hand counts on a tiny model, the frozen/trainable backward rules, mask density, and an independent
cross-check of every matmul/convolution against torch's FlopCounterMode on a real forward + backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from megafusion.config.schema import ImageConfig, UNetConfig
from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.model import HybridMask, LlamaArch, LlamaFusion, TokenLayout
from megafusion.training.flops import (
    count_step_flops,
    infer_text_needs_input_grad,
    model_flops_per_token_dense,
    num_lm_rows,
)
from megafusion.training.objective import TransfusionObjective, next_token_targets

# hidden 8, 1 layer, 2 heads of 4, 1 KV head, FFN 16, vocab 11 (+ BOI 11, EOI 12).
ARCH = dict(vocab_size=11, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
# 2x4x4 latents, patch 2 -> 2x2 = 4 tokens per image; U-Net 4 channels, 1 block, time embedding 6.
IMAGE = ImageConfig(latent_channels=2, latent_size=4, patch_size=2)
UNET = UNetConfig(channels=4, num_blocks=1, norm_groups=2, time_embed_dim=6)
T, I = 0, 1  # noqa: E741 (modality letters read like the sequence)


def tiny_model(separation: str = "deep", **arch) -> LlamaFusion:
    torch.manual_seed(0)
    return LlamaFusion(LlamaArch(**(ARCH | arch)), separation, IMAGE, UNET)


def layout(*rows: list[int], doc_ids: list[list[int]] | None = None) -> TokenLayout:
    modality = torch.tensor(list(rows))
    docs = None if doc_ids is None else torch.tensor(doc_ids)
    return TokenLayout.build(torch.zeros_like(modality), modality, doc_ids=docs, tokens_per_image=4)


# ---------------------------------------------------------------------------------------------- hand counts
# One row through one parameter set: q (8->8), k (8->4), v (8->4), o (8->8), gate/up (8->16), down (16->8).
PER_ROW = (2 * 8 * 8 + 2 * 8 * 4 + 2 * 8 * 4) + 2 * 8 * 8 + (2 * 8 * 16 + 2 * 8 * 16 + 2 * 16 * 8)
assert PER_ROW == 1152

# U-Net per image, forward. Down: time linear_1 (4->6), linear_2 (6->6); conv_in 3x3 2->4 on 4x4; ResNet block
# conv1/conv2 3x3 4->4 on 4x4 + time projection 6->4; to_tokens 2x2/2 conv 4->8 on a 2x2 output grid.
DOWN_LIN1, DOWN_LIN2 = 2 * 4 * 6, 2 * 6 * 6
DOWN_CONV_IN = 2 * 2 * 4 * 3 * 3 * (4 * 4)
DOWN_BLOCK = 2 * 4 * 4 * 3 * 3 * (4 * 4) + 2 * 6 * 4 + 2 * 4 * 4 * 3 * 3 * (4 * 4)
DOWN_TO_TOKENS = 2 * 4 * 8 * 2 * 2 * (2 * 2)
# Up: time linears again; from_tokens 2x2/2 transposed conv 8->4 over the 2x2 INPUT grid; block 8->4 (conv1 3x3
# 8->4, time projection, conv2 3x3 4->4, 1x1 shortcut 8->4) on 4x4; conv_out 3x3 4->2 on 4x4.
UP_LIN1, UP_LIN2 = 2 * 4 * 6, 2 * 6 * 6
UP_FROM_TOKENS = 2 * 8 * 4 * 2 * 2 * (2 * 2)
UP_BLOCK = 2 * 8 * 4 * 3 * 3 * (4 * 4) + 2 * 6 * 4 + 2 * 4 * 4 * 3 * 3 * (4 * 4) + 2 * 8 * 4 * 1 * 1 * (4 * 4)
UP_CONV_OUT = 2 * 4 * 2 * 3 * 3 * (4 * 4)
UNET_DOWN_FWD = DOWN_LIN1 + DOWN_LIN2 + DOWN_CONV_IN + DOWN_BLOCK + DOWN_TO_TOKENS
UNET_UP_FWD = UP_LIN1 + UP_LIN2 + UP_FROM_TOKENS + UP_BLOCK + UP_CONV_OUT
# Backward: weight grads everywhere, input grads except where the input is not differentiable (conv_in reads the
# noisy latents, linear_1 the sinusoidal timestep features).
UNET_DOWN_BWD = 2 * UNET_DOWN_FWD - DOWN_CONV_IN - DOWN_LIN1
UNET_UP_BWD = 2 * UNET_UP_FWD - UP_LIN1


def test_hand_count_text_image_text_frozen_text():
    # T T [I I I I] T T: 4 text rows, 4 image rows, one image; LM head on 2 rows.
    lay = layout([T, T, I, I, I, I, T, T])
    got = count_step_flops(tiny_model(), lay, num_lm_rows=2, text_trainable=False, text_needs_input_grad=True)

    # Causal pairs 8*9/2 = 36, plus the image's 4*3/2 = 6 pairs above the diagonal (bidirectional inside).
    pairs = 8 * 9 // 2 + 4 * 3 // 2
    attention = 2 * (2 * pairs * 4 + 2 * pairs * 4)  # heads * (QK^T + AV)
    expected_forward = {
        "linear.text": 4 * PER_ROW,
        "linear.image": 4 * PER_ROW,
        "linear.shared": 0,
        "attention": attention,
        "lm_head": 2 * 2 * 8 * 11,
        "special_head": 2 * 2 * 8 * 2,
        "unet_down": UNET_DOWN_FWD,
        "unet_up": UNET_UP_FWD,
    }
    expected_backward = {
        "linear.text": 1 * 4 * PER_ROW,  # frozen: input grad only
        "linear.image": 2 * 4 * PER_ROW,
        "linear.shared": 0,
        "attention": 2 * attention,
        "lm_head": 1 * 2 * 2 * 8 * 11,  # frozen
        "special_head": 2 * 2 * 2 * 8 * 2,  # trainable
        "unet_down": UNET_DOWN_BWD,
        "unet_up": UNET_UP_BWD,
    }
    assert {k: got.breakdown[f"{k}.forward"] for k in expected_forward} == expected_forward
    assert {k: got.breakdown[f"{k}.backward"] for k in expected_backward} == expected_backward
    assert len(got.breakdown) == 16
    assert got.forward == 4608 + 4608 + 1344 + 352 + 64 + 12712 + 18344
    assert got.backward == 4608 + 9216 + 2688 + 352 + 128 + (2 * 12712 - 2304 - 48) + (2 * 18344 - 48)
    assert got.total == got.forward + got.backward


def test_trainable_text_doubles_text_backward_only():
    model, lay = tiny_model(), layout([T, T, I, I, I, I, T, T])
    frozen = count_step_flops(model, lay, 2, text_trainable=False, text_needs_input_grad=True)
    trained = count_step_flops(model, lay, 2, text_trainable=True, text_needs_input_grad=True)
    assert trained.forward == frozen.forward
    diff = {k: v - frozen.breakdown[k] for k, v in trained.breakdown.items() if v != frozen.breakdown[k]}
    # Exactly one extra forward's worth (the weight grads) on the text set and on the main LM head.
    assert diff == {"linear.text.backward": 4 * PER_ROW, "lm_head.backward": 2 * 2 * 8 * 11}


def test_frozen_text_without_input_grad_has_no_text_backward():
    model, lay = tiny_model(), layout([T, T, I, I, I, I, T, T])
    with_grad = count_step_flops(model, lay, 2, text_trainable=False, text_needs_input_grad=True)
    no_grad = count_step_flops(model, lay, 2, text_trainable=False, text_needs_input_grad=False)
    assert no_grad.breakdown["linear.text.backward"] == 0
    assert no_grad.breakdown["lm_head.backward"] == 0
    assert no_grad.breakdown["special_head.backward"] == 2 * 2 * 8 * 2  # its weight grad only
    # Image rows still need attention's backward.
    assert no_grad.breakdown["attention.backward"] == with_grad.breakdown["attention.backward"] > 0
    assert with_grad.backward - no_grad.backward == 4 * PER_ROW + 2 * 2 * 8 * 11 + 2 * 2 * 8 * 2


def test_text_only_frozen_batch_backward_is_the_special_head_weight_grad():
    lay = layout([T] * 6)
    got = count_step_flops(tiny_model(), lay, 5, text_trainable=False, text_needs_input_grad=False)
    assert got.forward == 6 * PER_ROW + 2 * (2 * 21 * 4 + 2 * 21 * 4) + 2 * 5 * 8 * 11 + 2 * 5 * 8 * 2
    assert got.backward == 2 * 5 * 8 * 2
    assert got.breakdown["unet_down.forward"] == got.breakdown["unet_up.forward"] == 0


# ------------------------------------------------------------------------------------------- mask density
@pytest.mark.parametrize(
    ("rows", "docs", "pairs"),
    [
        ([T] * 12, None, 12 * 13 // 2),                                      # text only: causal
        ([T, T] + [I] * 4 + [T] * 6, None, 12 * 13 // 2 + 6),                # one image: + 4*3/2 bidirectional
        ([T] + [I] * 4 + [T] + [I] * 4 + [T, T], None, 12 * 13 // 2 + 6 + 6),  # two images
        ([T] * 12, [[0] * 6 + [1] * 6], 2 * (6 * 7 // 2)),                   # two packed documents
    ],
)
def test_attention_flops_follow_mask_density(rows, docs, pairs):
    lay = layout(rows, doc_ids=docs)
    got = count_step_flops(tiny_model(), lay, 0, text_trainable=False, text_needs_input_grad=True)
    assert got.breakdown["attention.forward"] == 2 * (2 * pairs * 4 + 2 * pairs * 4)
    assert got.breakdown["attention.backward"] == 2 * got.breakdown["attention.forward"]


def test_attention_sums_batch_rows_and_scales_with_layers():
    lay = layout([T] * 12, [T, T] + [I] * 4 + [T] * 6)
    got = count_step_flops(tiny_model(num_layers=3), lay, 0, text_trainable=False, text_needs_input_grad=True)
    pairs = 78 + 84
    assert got.breakdown["attention.forward"] == 3 * 2 * (2 * pairs * 4 + 2 * pairs * 4)
    assert got.breakdown["unet_down.forward"] == UNET_DOWN_FWD  # one image in the batch


def random_layout(g: torch.Generator) -> TokenLayout:
    """Up to 4 rows of text runs and 4-token images (some adjacent), packed documents, sometimes a doc id that
    comes back later in the row (padding-like)."""
    batch = int(torch.randint(1, 5, (1,), generator=g))
    rows, docs = [], []
    for _ in range(batch):
        mod: list[int] = []
        while len(mod) < 24:
            mod += [I] * 4 if torch.rand(1, generator=g) < 0.4 else [T] * int(torch.randint(1, 4, (1,), generator=g))
        rows.append(mod[:28] + [T] * (28 - len(mod[:28])))
        cuts = sorted(torch.randint(0, 29, (2,), generator=g).tolist())
        doc = [0] * cuts[0] + [1] * (cuts[1] - cuts[0]) + [2] * (28 - cuts[1])
        if torch.rand(1, generator=g) < 0.3:
            doc = [d if d != 2 else 0 for d in doc]  # doc 0 again after doc 1
        docs.append(doc)
    modality = torch.tensor(rows)
    return TokenLayout.build(torch.zeros_like(modality), modality, doc_ids=torch.tensor(docs), tokens_per_image=4)


def test_pair_count_equals_the_dense_hybrid_mask():
    # The counter counts pairs from the rule in O(S log S); the mask module's dense matrix is the reference.
    g = torch.Generator().manual_seed(0)
    model = tiny_model()
    for _ in range(30):
        lay = random_layout(g)
        got = count_step_flops(model, lay, 0, text_trainable=False, text_needs_input_grad=True)
        pairs = int(HybridMask(lay).dense().sum())
        assert got.breakdown["attention.forward"] == 2 * (2 * pairs * 4 + 2 * pairs * 4)


# --------------------------------------------------------------------------------------------- separations
def test_shared_set_sees_all_rows_and_backprops_through_frozen_weights():
    lay = layout([T, T, I, I, I, I, T, T])
    got = count_step_flops(tiny_model("none"), lay, 2, text_trainable=False, text_needs_input_grad=False)
    assert got.breakdown["linear.shared.forward"] == 8 * PER_ROW
    assert got.breakdown["linear.text.forward"] == got.breakdown["linear.image.forward"] == 0
    # One matmul over all rows: image rows need the input grad, so autograd computes it for all 8 rows.
    assert got.breakdown["linear.shared.backward"] == 8 * PER_ROW
    ffn_only = count_step_flops(tiny_model("ffn"), lay, 2, text_trainable=False, text_needs_input_grad=True)
    attn_per_row = 2 * 8 * 8 + 2 * 8 * 4 + 2 * 8 * 4 + 2 * 8 * 8
    assert ffn_only.breakdown["linear.shared.forward"] == 8 * attn_per_row
    assert ffn_only.breakdown["linear.text.forward"] == 4 * (PER_ROW - attn_per_row)


def test_dense_6n_matches_trainable_text_only_linear_count():
    arch = LlamaArch(**ARCH)
    per_layer = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16
    assert model_flops_per_token_dense(arch) == 6 * (per_layer + 8 * 11)
    # A fully trainable text-only step with the LM head on every token is 6N per token for the matmul weights.
    got = count_step_flops(tiny_model(), layout([T] * 6), 6, text_trainable=True, text_needs_input_grad=True)
    weights = sum(got.breakdown[f"{k}.{p}"] for k in ("linear.text", "lm_head") for p in ("forward", "backward"))
    assert weights == 6 * model_flops_per_token_dense(arch)


def test_rejects_bad_inputs_and_unknown_modules():
    model, lay = tiny_model(), layout([T, T, I, I, I, I, T, T])
    with pytest.raises(ValueError, match="num_lm_rows"):
        count_step_flops(model, lay, 5, text_trainable=False, text_needs_input_grad=True)
    model.unet_up.conv_out = nn.Sequential(nn.Conv2d(4, 2, 3, padding=1))
    with pytest.raises(NotImplementedError, match="unet_up"):
        count_step_flops(model, lay, 2, text_trainable=False, text_needs_input_grad=True)
    model = tiny_model()
    model.layers[0].ffn.text.gate_proj = nn.Embedding(8, 16)
    with pytest.raises(NotImplementedError, match="Embedding"):
        count_step_flops(model, lay, 2, text_trainable=False, text_needs_input_grad=True)


# ----------------------------------------------------------------------- independent reference: FlopCounterMode
MATMUL_OPS = {"aten.mm", "aten.addmm", "aten.convolution", "aten.convolution_backward"}


def measured(mode: FlopCounterMode) -> int:
    """Linear and convolution FLOPs torch saw (attention's SDPA/bmm ops left out: torch counts the full square)."""
    return sum(v for op, v in mode.get_flop_counts()["Global"].items() if str(op) in MATMUL_OPS)


def objective_batch() -> dict[str, torch.Tensor]:
    """Two rows: caption -> BOI image EOI -> text, and BOI image EOI -> caption, as the trainer feeds them."""
    boi, eoi = 11, 12
    ids = torch.tensor([[1, 2, boi, 0, 0, 0, 0, eoi, 3, 4], [boi, 0, 0, 0, 0, eoi, 5, 6, 7, 8]])
    modality = torch.tensor([[T, T, T, I, I, I, I, T, T, T], [T, I, I, I, I, T, T, T, T, T]])
    g = torch.Generator().manual_seed(0)
    return {"input_ids": ids, "modality": modality, "latents": torch.randn(2, 2, 4, 4, generator=g)}


@pytest.mark.parametrize("separation", ["deep", "none"])
@pytest.mark.parametrize("text_trainable", [False, True])
def test_matches_flop_counter_mode_on_a_real_step(separation, text_trainable):
    model = tiny_model(separation)
    for _, p in model.grouped_parameters()["text"]:
        p.requires_grad_(text_trainable)
    batch = objective_batch()
    objective = TransfusionObjective(DDPMSchedule(), loss_weight=5.0)
    with FlopCounterMode(display=False) as fwd_mode:
        out = objective(model, **batch, generator=torch.Generator().manual_seed(1))
    with FlopCounterMode(display=False) as bwd_mode:
        out.loss.backward()

    lay = TokenLayout.build(batch["input_ids"], batch["modality"], tokens_per_image=4)
    needs_grad = infer_text_needs_input_grad(model, lay, batch["input_ids"], text_trainable)
    assert needs_grad  # images in the batch: text rows carry gradients even with the text frozen
    targets = next_token_targets(batch["input_ids"], batch["modality"])
    assert num_lm_rows(targets, batch["modality"]) == out.num_text_targets == 8
    # The shifted targets also hold the EOI after each image's last token; those rows never reach the LM head.
    assert int((targets != -100).sum()) == 8 + 2
    got = count_step_flops(model, lay, out.num_text_targets, text_trainable, needs_grad)
    assert got.forward - got.breakdown["attention.forward"] == measured(fwd_mode)
    assert got.backward - got.breakdown["attention.backward"] == measured(bwd_mode)


def test_text_only_frozen_step_matches_flop_counter_mode():
    model = tiny_model()
    for _, p in model.grouped_parameters()["text"]:
        p.requires_grad_(False)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with FlopCounterMode(display=False) as fwd_mode:
        out = TransfusionObjective(DDPMSchedule(), loss_weight=5.0)(model, ids)
    with FlopCounterMode(display=False) as bwd_mode:
        out.loss.backward()
    lay = TokenLayout.build(ids)
    assert not infer_text_needs_input_grad(model, lay, ids, text_trainable=False)
    got = count_step_flops(model, lay, out.num_text_targets, False, False)
    assert got.forward - got.breakdown["attention.forward"] == measured(fwd_mode)
    assert got.backward == measured(bwd_mode) == 2 * 7 * 8 * 2  # the special head's weight grad, nothing else
    # A BOI in the batch makes the (trainable) special embedding part of every text row.
    boi_ids = torch.tensor([[1, 2, 11, 4]])
    assert infer_text_needs_input_grad(model, TokenLayout.build(boi_ids), boi_ids, text_trainable=False)


# --------------------------------------------------------------------------------- rows run without autograd
def test_frozen_rows_have_forward_only():
    # Doc 0: T T [I I I I] T T, doc 1: T T (text only). Frozen: doc 0's first 2 rows and doc 1's 2 rows.
    lay = layout([T, T, I, I, I, I, T, T, T, T], doc_ids=[[0] * 8 + [1] * 2])
    frozen = torch.tensor([[True, True] + [False] * 6 + [True, True]])
    model = tiny_model()
    full = count_step_flops(model, lay, 5, text_trainable=False, text_needs_input_grad=True)
    got = count_step_flops(model, lay, 5, False, True, frozen=frozen, frozen_lm_rows=3)
    assert got.forward == full.forward
    diff = {k: full.breakdown[k] - v for k, v in got.breakdown.items() if v != full.breakdown[k]}
    # Frozen queries see 1 + 2 (doc 0) + 1 + 2 (doc 1) keys.
    frozen_attention = 2 * (2 * 6 * 4 + 2 * 6 * 4)
    assert diff == {
        "linear.text.backward": 4 * PER_ROW,  # input grads of 4 of the 6 text rows
        "attention.backward": 2 * frozen_attention,
        "lm_head.backward": 3 * 2 * 8 * 11,  # input grad of 3 of the 5 LM rows
        "special_head.backward": 3 * 2 * 8 * 2,  # and of their BOI/EOI logits (the weight grad stays)
    }
    shared = count_step_flops(tiny_model("none"), lay, 5, False, True, frozen=frozen, frozen_lm_rows=3)
    assert shared.breakdown["linear.shared.backward"] == 6 * PER_ROW  # all rows but the 4 frozen ones
    with pytest.raises(ValueError, match="frozen"):
        count_step_flops(model, lay, 5, True, True, frozen=frozen, frozen_lm_rows=3)
    with pytest.raises(ValueError, match="frozen_lm_rows"):
        count_step_flops(model, lay, 5, False, True, frozen=frozen, frozen_lm_rows=5)


def test_frozen_rows_step_matches_flop_counter_mode():
    """The objective with the split on, on rows that need no padding (2 frozen rows each), against torch's count."""
    model = tiny_model()
    for _, p in model.grouped_parameters()["text"]:
        p.requires_grad_(False)
    boi, eoi = 11, 12
    ids = torch.tensor([[1, 2, boi, 0, 0, 0, 0, eoi, 3, 4], [9, boi, 0, 0, 0, 0, eoi, 7, 8, 5]])
    modality = torch.tensor([[T, T, T, I, I, I, I, T, T, T], [T, T, I, I, I, I, T, T, T, T]])
    doc_ids = torch.tensor([[0] * 10, [0] * 9 + [1]])
    latents = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    objective = TransfusionObjective(DDPMSchedule(), loss_weight=5.0, skip_frozen_rows=True)
    with FlopCounterMode(display=False) as fwd_mode:
        out = objective(model, ids, modality, latents=latents, doc_ids=doc_ids,
                        generator=torch.Generator().manual_seed(1))
    with FlopCounterMode(display=False) as bwd_mode:
        out.loss.backward()
    assert out.frozen_rows.sum(1).tolist() == [2, 2] and out.num_frozen_lm_rows == 3
    lay = TokenLayout.build(ids, modality, doc_ids=doc_ids, tokens_per_image=4)
    got = count_step_flops(model, lay, out.num_text_targets, False, True, out.frozen_rows, out.num_frozen_lm_rows)
    assert got.forward - got.breakdown["attention.forward"] == measured(fwd_mode)
    assert got.backward - got.breakdown["attention.backward"] == measured(bwd_mode)
    full = count_step_flops(model, lay, out.num_text_targets, False, True)
    assert got.forward == full.forward and got.backward < full.backward
