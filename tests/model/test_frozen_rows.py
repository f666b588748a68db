"""Rows no trainable parameter reaches run without autograd (model/frozen_rows.py): which rows they are, and that the
objective's loss and every trainable gradient equal the full computation on packed batches mixing caption-first,
image-first and text-only documents, for every separation and attention backend on CPU."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.model import LlamaFusion, TokenLayout
from megafusion.model.frozen_rows import FrozenSplit, frozen_rows
from megafusion.training.objective import TransfusionObjective, frozen_rows_cross_entropy, next_token_targets
from tests.helpers import TINY_IMAGE, TINY_UNET, save_tiny_llama
from tests.kernels.layouts import rel_err

# A document is a list of segments: ("t", n) n base-vocabulary tokens, ("img",) BOI + one image + EOI.
CAPTION_FIRST = [("t", 5), ("img",), ("t", 1)]
IMAGE_FIRST = [("t", 1), ("img",), ("t", 6)]
TEXT_ONLY = [("t", 7)]
# Three rows with different numbers of frozen rows (the split pads them), the caption-first document's caption
# mid-row in the first, and a row with two images in one document.
ROWS = [
    [IMAGE_FIRST, CAPTION_FIRST, TEXT_ONLY],
    [CAPTION_FIRST, [("t", 3), ("img",), ("t", 2), ("img",), ("t", 2)], [("t", 2)]],
    [TEXT_ONLY, IMAGE_FIRST, [("t", 4), ("img",)]],
]


def packed_batch(model: LlamaFusion, rows: list[list[list[tuple]]] = ROWS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows of packed documents (right-padded with text-only filler documents to one length), as the loader
    collates them: input_ids, modality, doc_ids, labels, latents, image_first."""
    g = torch.Generator().manual_seed(seed)
    n = model.image_config.tokens_per_image
    ids, mod, docs, first = [], [], [], []
    for row in rows:
        r_ids, r_mod, r_doc = [], [], []
        for d, doc in enumerate(row):
            for seg in doc:
                if seg[0] == "t":
                    r_ids += torch.randint(0, model.arch.vocab_size, (seg[1],), generator=g).tolist()
                    r_mod += [0] * seg[1]
                else:
                    first.append(all(s[0] == "img" or s[1] <= 1 for s in doc[: doc.index(seg)]))
                    r_ids += [model.boi_id] + [0] * n + [model.eoi_id]
                    r_mod += [0] + [1] * n + [0]
            r_doc += [d] * (len(r_ids) - len(r_doc))
        ids.append(r_ids)
        mod.append(r_mod)
        docs.append(r_doc)
    length = max(map(len, ids))
    for r_ids, r_mod, r_doc in zip(ids, mod, docs, strict=True):
        pad = length - len(r_ids)
        r_ids += torch.randint(0, model.arch.vocab_size, (pad,), generator=g).tolist()
        r_mod += [0] * pad
        r_doc += [r_doc[-1] + 1] * pad
    input_ids = torch.tensor(ids)
    c, s = model.image_config.latent_channels, model.image_config.latent_size
    labels = input_ids.clone()
    labels[0, 2] = -100  # a masked label on a frozen row
    return {
        "input_ids": input_ids, "modality": torch.tensor(mod), "doc_ids": torch.tensor(docs), "labels": labels,
        "latents": torch.randn(len(first), c, s, s, generator=g), "image_first": torch.tensor(first),
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(path, "gqa-untied")
    return path


def frozen_text_model(base, separation: str) -> LlamaFusion:
    torch.manual_seed(0)
    model = LlamaFusion.from_llama(base, separation=separation, image=TINY_IMAGE, unet=TINY_UNET)
    with torch.no_grad():
        # Image set and BOI/EOI rows away from their text-derived init, so a row on the wrong path shows up.
        for name, p in model.named_parameters():
            if LlamaFusion.parameter_group(name) == "image":
                p.add_(0.05 * torch.randn_like(p))
    for name, p in model.named_parameters():
        p.requires_grad_(LlamaFusion.parameter_group(name) == "image")
    return model


def loss_and_grads(model: LlamaFusion, batch: dict, skip: bool, **objective_kwargs):
    model.zero_grad(set_to_none=True)
    objective = TransfusionObjective(DDPMSchedule(), 5.0, skip_frozen_rows=skip, **objective_kwargs)
    out = objective(model, batch["input_ids"], batch["modality"], latents=batch["latents"],
                    image_first=batch["image_first"], doc_ids=batch["doc_ids"], labels=batch["labels"],
                    generator=torch.Generator().manual_seed(1))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out, grads


def global_rel_err(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """||grads - ref|| / ||ref|| over every gradient as one vector."""
    num = sum(float((grads[n].double() - g.double()).pow(2).sum()) for n, g in ref.items())
    return (num / sum(float(g.double().pow(2).sum()) for g in ref.values())) ** 0.5


def assert_same_gradients(model, out, grads, ref, ref_grads, tol=1e-6):
    """fp32 can only promise equality up to rounding: the split sums the same terms in another order (attention
    over other key sets, weight gradients over other row counts). Measured here, the full computation itself lies
    ~7e-7 (all gradients) / ~1.5e-6 (the worst tensor's largest element) from an fp64 run, and the split is as
    close to it. So: `tol` on all gradients together, 10x `tol` on each tensor's largest deviation."""
    assert ref.frozen_rows is None and out.frozen_rows is not None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() == trainable
    for name in ("loss", "lm_loss", "diffusion_loss"):
        assert rel_err(getattr(out, name), getattr(ref, name)) < tol, name
    assert out.num_text_targets == ref.num_text_targets
    assert_close_gradients(grads, ref_grads, tol)


def assert_close_gradients(grads, ref_grads, tol=1e-6):
    assert grads.keys() == ref_grads.keys()
    assert global_rel_err(grads, ref_grads) < tol
    for name, g in ref_grads.items():
        assert rel_err(grads[name], g) < 10 * tol, name


def test_frozen_rows_are_text_before_the_first_image_or_special_token_of_their_document(base):
    model = frozen_text_model(base, "deep")
    batch = packed_batch(model)
    lay = TokenLayout.build(batch["input_ids"], batch["modality"], doc_ids=batch["doc_ids"], tokens_per_image=4)
    got = frozen_rows(batch["input_ids"], lay, model.arch.vocab_size)
    # Row 0: image-first (1 prefix token frozen; BOI onward not), caption-first (5 caption tokens frozen, not its
    # BOI: the trainable BOI embedding is in that row), text-only (all 7), filler.
    expected = [1] + [0] * 12 + [1] * 5 + [0] * 7 + [1] * 7
    assert got[0, : len(expected)].tolist() == [bool(e) for e in expected]
    assert got[0, len(expected):].all()  # the filler document is text-only
    # Documents are told apart by id, not by being contiguous: text after doc 1's image, in a second run of it.
    ids = torch.tensor([[1, 2, model.boi_id, 0, 0, 0, 0, model.eoi_id, 3, 4]])
    mod = torch.tensor([[0] * 3 + [1] * 4 + [0] * 3])
    docs = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 0, 1]])
    lay = TokenLayout.build(ids, mod, doc_ids=docs, tokens_per_image=4)
    assert frozen_rows(ids, lay, model.arch.vocab_size).tolist() == [[True, True] + [False] * 6 + [True, False]]
    # Nothing to split: text only (all frozen) or no frozen row.
    text = torch.tensor([[1, 2, 3]])
    assert FrozenSplit.of(text, TokenLayout.build(text), model.arch.vocab_size) is None


@pytest.mark.parametrize("separation", ["deep", "ffn", "none"])
def test_gradients_equal_the_full_computation(base, separation):
    model = frozen_text_model(base, separation)
    batch = packed_batch(model)
    ref, ref_grads = loss_and_grads(model, batch, skip=False)
    out, grads = loss_and_grads(model, batch, skip=True)
    assert_same_gradients(model, out, grads, ref, ref_grads)
    # Every frozen target's loss is in the sum (the BOI/EOI head trains, so it reaches them).
    assert out.num_frozen_lm_rows > 0 and int(out.frozen_rows.sum()) == 14 + 10 + 15


def test_gradients_equal_the_full_computation_in_fp64(base):
    """In fp64 the two agree to the objective's own fp32 casts of logits and predictions: the split is exact."""
    model = frozen_text_model(base, "deep").double()
    batch = packed_batch(model)
    ref, ref_grads = loss_and_grads(model, batch, skip=False)
    out, grads = loss_and_grads(model, batch, skip=True)
    assert_same_gradients(model, out, grads, ref, ref_grads, tol=1e-12)


@pytest.mark.parametrize("attention", [
    "flex",
    pytest.param("triton", marks=pytest.mark.skipif(not importlib.util.find_spec("triton"),
                                                    reason="triton is not installed")),
])
def test_gradients_equal_the_full_computation_on_other_attention_backends(base, attention, monkeypatch):
    # Eager FlexAttention (its compiled path is tested in tests/kernels) and the Triton kernel in the interpreter.
    monkeypatch.setenv("MEGAFUSION_FLEX_COMPILE", "0")
    model = frozen_text_model(base, "deep")
    model.attention_backend = attention
    batch = packed_batch(model, ROWS[:2])
    ref, ref_grads = loss_and_grads(model, batch, skip=False)
    out, grads = loss_and_grads(model, batch, skip=True)
    assert_same_gradients(model, out, grads, ref, ref_grads)


def test_a_trainable_text_path_turns_the_split_off(base):
    model = frozen_text_model(base, "deep")
    model.norm.weight.requires_grad_(True)  # one text-group parameter is enough
    out, grads = loss_and_grads(model, packed_batch(model), skip=True)
    assert out.frozen_rows is None and "norm.weight" in grads


def test_frozen_special_head_skips_the_frozen_rows_loss_unless_asked(base):
    model = frozen_text_model(base, "deep")
    model.special_head.requires_grad_(False)
    batch = packed_batch(model)
    ref, ref_grads = loss_and_grads(model, batch, skip=False)
    out, grads = loss_and_grads(model, batch, skip=True)
    # The skipped loss is a constant: same gradients, normalised by every target; the logged mean covers the rest.
    assert_close_gradients(grads, ref_grads)
    assert out.num_frozen_lm_rows == 0 and out.num_text_targets < ref.num_text_targets
    logged, _ = loss_and_grads(model, batch, skip=True, frozen_loss_every=1)
    assert logged.num_text_targets == ref.num_text_targets
    assert rel_err(logged.lm_loss, ref.lm_loss) < 1e-6


def test_model_outputs_match_the_full_computation_row_by_row(base):
    """The split's LM outputs are the full forward's, row by row; text logits at inference are the same call as
    before (the split only runs in training calls)."""
    model = frozen_text_model(base, "deep")
    batch = packed_batch(model)
    lay = TokenLayout.build(batch["input_ids"], batch["modality"], doc_ids=batch["doc_ids"], tokens_per_image=4)
    targets = next_token_targets(batch["input_ids"], lay.modality, lay.doc_ids, batch["labels"])
    images, t = batch["latents"], torch.arange(batch["latents"].shape[0]) * 100
    args = (batch["input_ids"], lay.modality, lay.image_ids, lay.doc_ids, lay.position_ids)
    with torch.no_grad():
        full = model(*args, images=images, timesteps=t)
    split = model(*args, images=images, timesteps=t, compute_logits=False, lm_targets=targets, frozen_split=True)
    assert split.frozen_rows is not None
    logits = torch.cat((full.logits, full.special_logits), dim=-1)
    assert rel_err(split.noise_pred, full.noise_pred) < 1e-6
    has_target = targets != -100
    learning = has_target & ~split.frozen_rows & (lay.modality == 0)
    assert rel_err(split.lm_logits, logits[learning]) < 1e-6
    frozen = has_target & split.frozen_rows
    assert torch.equal(split.frozen_lm_targets, targets[frozen])
    reduced = split.frozen_lm_logits.detach()
    assert rel_err(reduced[:, 0], torch.logsumexp(full.logits[frozen], dim=-1)) < 1e-6
    assert rel_err(reduced[:, 2:], full.special_logits[frozen]) < 1e-6
    ce = torch.nn.functional.cross_entropy(logits[frozen], targets[frozen], reduction="none")
    assert rel_err(frozen_rows_cross_entropy(reduced, targets[frozen], model.arch.vocab_size), ce) < 1e-6
    # Inference: no split, with or without autograd.
    with torch.no_grad():
        again = model(*args, images=images, timesteps=t)
    assert torch.equal(again.logits, full.logits)
    assert model(*args, images=images, timesteps=t).frozen_rows is None


def test_router_leaves_padding_out_of_the_grouped_rows():
    from megafusion.model import ModalityRouter

    modality = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    router = ModalityRouter(modality, valid=valid)
    assert (router.num_text, router.num_image) == (3, 2)
    assert router.text_index.tolist() == [0, 2, 5]
    x = torch.arange(8.0).reshape(2, 4, 1) + 1
    grouped = router.to_grouped(x)
    assert grouped.flatten().tolist() == [1, 3, 6, 2, 5]
    assert router.to_sequence(grouped).flatten().tolist() == [1, 2, 3, 0, 5, 6, 0, 0]
