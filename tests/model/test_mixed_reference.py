"""The mixed (text + image) forward against a plain per-token reference written here.

The reference takes only the weights from the model. Everything else it works out itself, one token at a time:
the weight set each token uses (picked by the token's modality), the RoPE positions (restarting in each packed
document), the paper's mask rule, GQA, RMSNorm and SwiGLU. It runs in float64. The model's U-Net down supplies
the image tokens that enter layer 0; the U-Net is not under test here.

Not observable here: restarting the positions at each document rather than continuing them. RoPE sees only
position differences and the mask keeps attention inside a document, so shifting a document's positions by a
constant leaves every output unchanged.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from megafusion.model import LlamaFusion
from megafusion.model.routing import Routed
from tests.helpers import TINY_IMAGE, TINY_UNET, save_tiny_llama

SEPARATIONS = ("deep", "ffn", "none")
# Which sub-blocks of a layer have a separate image set (paper, section 5). "attn_in" is the pre-attention norm
# + Q/K/V, "attn_out" the O projection, "ffn" the pre-FFN norm + SwiGLU. Any other sub-block is one shared set.
SEPARATE = {"deep": {"attn_in", "attn_out", "ffn"}, "ffn": {"ffn"}, "none": set()}
N = TINY_IMAGE.tokens_per_image
TXT, IMG, BOI, EOI = "text", "image", "boi", "eoi"
# Two rows, each holding two packed documents (plus padding as a third document in row 0). Images come
# caption-first and image-first, and one document holds two images. Each entry is (kind, count, document).
ROWS = [
    [(TXT, 3, 0), (BOI, 1, 0), (IMG, N, 0), (EOI, 1, 0), (TXT, 2, 0),
     (BOI, 1, 1), (IMG, N, 1), (EOI, 1, 1), (TXT, 3, 1), (TXT, 4, 2)],
    [(BOI, 1, 0), (IMG, N, 0), (EOI, 1, 0), (TXT, 4, 0),
     (TXT, 1, 1), (BOI, 1, 1), (IMG, N, 1), (EOI, 1, 1), (TXT, 1, 1), (BOI, 1, 1), (IMG, N, 1), (EOI, 1, 1)],
]


def _batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids, mods, docs = [], [], []
    for row in ROWS:
        r_ids, r_mod, r_doc = [], [], []
        for kind, count, doc in row:
            if kind == TXT:
                r_ids += torch.randint(0, vocab, (count,), generator=g).tolist()
            else:
                r_ids += [{BOI: vocab, EOI: vocab + 1, IMG: 0}[kind]] * count
            r_mod += [int(kind == IMG)] * count
            r_doc += [doc] * count
        ids.append(r_ids)
        mods.append(r_mod)
        docs.append(r_doc)
    num_images = sum(kind == IMG for row in ROWS for kind, _, _ in row)
    c, s = TINY_IMAGE.latent_channels, TINY_IMAGE.latent_size
    return {
        "input_ids": torch.tensor(ids),
        "modality": torch.tensor(mods),
        "doc_ids": torch.tensor(docs),
        "images": torch.randn(num_images, c, s, s, generator=g),
        "timesteps": torch.tensor([10, 999, 400, 0, 700])[:num_images],
    }


def _model(path, separation: str) -> LlamaFusion:
    # initializer_range 0.2: attention scores of order 1, so a wrong mask or position changes the softmax visibly.
    save_tiny_llama(path, "gqa-untied", initializer_range=0.2)
    model = LlamaFusion.from_llama(path, separation=separation, image=TINY_IMAGE, unet=TINY_UNET).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        # The image set starts as a copy of the text set. Perturb it so the test can tell the two apart.
        for module in model.modules():
            if isinstance(module, Routed) and module.separate:
                for p in module.image.parameters():  # every entry scaled by its own factor in ~[0.5, 1.5]
                    p.mul_(1 + 0.25 * torch.randn(p.shape, generator=g))
        for p in (model.special_embed, model.special_head):  # BOI and EOI start as the same row
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _weights(block, part: str, separation: str, is_image: bool) -> dict[str, torch.Tensor]:
    routed = getattr(block, part)
    module = (routed.image if is_image else routed.text) if part in SEPARATE[separation] else routed.shared
    return {name: p.detach().double() for name, p in module.named_parameters()}


def _rms(x, weight, eps):
    return weight * x / torch.sqrt(x.pow(2).mean() + eps)


def _rope(x, pos, theta):
    """x: (heads, D), rotate-half convention of the Llama reference, angle pos * theta^(-2i/D)."""
    half = x.shape[-1] // 2
    angle = pos * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    x1, x2 = x[:, :half], x[:, half:]
    return torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), dim=-1)


def reference_forward(model: LlamaFusion, separation: str, batch, image_tokens, swap_sets: bool = False):
    """Returns (final hidden states (rows, S, d) before any output norm, the allowed mask, the image id per token).
    swap_sets routes every token through the other modality's set (used to show that the test can fail)."""
    a = model.arch
    ids, modality, doc = batch["input_ids"], batch["modality"], batch["doc_ids"]
    rows, seq = ids.shape
    heads, kv_heads, hd, eps = a.num_heads, a.num_kv_heads, a.head_dim, a.rms_norm_eps
    x = torch.zeros(rows, seq, a.hidden_size, dtype=torch.float64)
    image_of = torch.full((rows, seq), -1)
    pos = torch.zeros(rows, seq)
    flat_image_tokens = image_tokens.reshape(-1, a.hidden_size).double()
    k_img = 0
    for b in range(rows):
        for s in range(seq):
            t = int(ids[b, s])
            if modality[b, s] == 1:  # image tokens in row-major order, tokens_per_image per image
                x[b, s], image_of[b, s] = flat_image_tokens[k_img], k_img // N
                k_img += 1
            elif t >= a.vocab_size:
                x[b, s] = model.special_embed[t - a.vocab_size].double()
            else:
                x[b, s] = model.embed_tokens.weight[t].double()
            first = min(j for j in range(seq) if doc[b, j] == doc[b, s])
            pos[b, s] = s - first  # one 1-D position sequence per document, images included
    assert k_img == flat_image_tokens.shape[0]
    # The paper's rule: same document AND (causal OR both in the same image).
    allowed = torch.zeros(rows, seq, seq, dtype=torch.bool)
    for b in range(rows):
        for i in range(seq):
            for j in range(seq):
                same_image = image_of[b, i] >= 0 and image_of[b, i] == image_of[b, j]
                allowed[b, i, j] = bool(doc[b, i] == doc[b, j]) and (j <= i or bool(same_image))

    def is_image(b, s):
        return bool(modality[b, s] == 1) != swap_sets

    for block in model.layers:
        q = torch.zeros(rows, seq, heads, hd, dtype=torch.float64)
        k = torch.zeros(rows, seq, kv_heads, hd, dtype=torch.float64)
        v = torch.zeros(rows, seq, kv_heads, hd, dtype=torch.float64)
        for b in range(rows):
            for s in range(seq):
                w = _weights(block, "attn_in", separation, is_image(b, s))
                h = _rms(x[b, s], w["norm.weight"], eps)
                q[b, s] = _rope((w["q_proj.weight"] @ h).view(heads, hd), pos[b, s], a.rope_theta)
                k[b, s] = _rope((w["k_proj.weight"] @ h).view(kv_heads, hd), pos[b, s], a.rope_theta)
                v[b, s] = (w["v_proj.weight"] @ h).view(kv_heads, hd)
        new_x = x.clone()
        for b in range(rows):
            for i in range(seq):
                keys = allowed[b, i].nonzero().squeeze(1)
                out = []
                for head in range(heads):
                    g = head // (heads // kv_heads)  # GQA: consecutive query heads share one K/V head
                    p = torch.softmax(k[b, keys, g] @ q[b, i, head] / math.sqrt(hd), dim=0)
                    out.append(p @ v[b, keys, g])
                w_o = _weights(block, "attn_out", separation, is_image(b, i))["weight"]
                new_x[b, i] = x[b, i] + w_o @ torch.cat(out)
        x = new_x
        for b in range(rows):
            for s in range(seq):
                w = _weights(block, "ffn", separation, is_image(b, s))
                h = _rms(x[b, s], w["norm.weight"], eps)
                gate, up = w["gate_proj.weight"] @ h, w["up_proj.weight"] @ h
                x[b, s] = x[b, s] + w["down_proj.weight"] @ (F.silu(gate) * up)
    return x, allowed, image_of


def _run(model: LlamaFusion, separation: str, batch, swap_sets: bool = False):
    """Model outputs, and the reference's text logits / special logits / image hidden states / noise."""
    captured = []
    hook = model.unet_up.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().clone()))
    with torch.no_grad():
        out = model(**batch)
        hook.remove()
        image_tokens, skip = model.unet_down(batch["images"], batch["timesteps"])
        x, _, _ = reference_forward(model, separation, batch, image_tokens, swap_sets)
        is_text = batch["modality"] == 0
        text_h = torch.stack([_rms(h, model.norm.weight.double(), model.arch.rms_norm_eps) for h in x[is_text]])
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        ref = {
            "logits": text_h @ head.double().T,
            "special_logits": text_h @ model.special_head.double().T,
            "image_hidden": x[~is_text].view(-1, N, x.shape[-1]),
        }
        ref["noise_pred"] = model.unet_up(ref["image_hidden"].float(), batch["timesteps"], skip)
    got = {
        "logits": out.logits[is_text],
        "special_logits": out.special_logits[is_text],
        "image_hidden": captured[0],
        "noise_pred": out.noise_pred,
    }
    return got, ref


@pytest.mark.parametrize("separation", SEPARATIONS)
def test_mixed_forward_equals_per_token_reference(tmp_path, separation):
    model = _model(tmp_path, separation)
    batch = _batch(model.arch.vocab_size)
    got, ref = _run(model, separation, batch)
    for name in ("logits", "special_logits", "image_hidden", "noise_pred"):
        assert got[name].dtype == torch.float32
        # fp32 against float64: 1e-5 of the tensor's scale (image hidden states reach ~10, logits ~5).
        scale = max(1.0, ref[name].abs().max().item())
        diff = (got[name].double() - ref[name].double()).abs().max().item()
        assert got[name].shape == ref[name].shape and diff <= 1e-5 * scale, f"{name}: max diff {diff:.3g}"


def test_reference_mask_is_the_paper_rule_on_this_batch(tmp_path):
    """Pins down what the batch exercises: cross-document, causal, bidirectional-in-image, image-to-other-image."""
    model = _model(tmp_path, "none")
    batch = _batch(model.arch.vocab_size)
    tokens = torch.zeros(batch["images"].shape[0], N, model.arch.hidden_size)
    _, allowed, image_of = reference_forward(model, "none", batch, tokens)
    row1_images = image_of[1][image_of[1] >= 0].unique().tolist()
    assert image_of.max() == 4 and len(row1_images) == 3  # 5 images, the last two in one document of row 1
    first, second = ((image_of[1] == i).nonzero().squeeze(1) for i in row1_images[1:])
    assert allowed[1][first[0], first[-1]]  # an image's first token sees its last one (bidirectional)
    assert not allowed[1][first[-1], second[0]]  # but not a later image of the same document
    assert allowed[1][second[0], first[-1]]  # which sees the earlier image causally
    doc1_start = int((batch["doc_ids"][1] == 1).nonzero()[0])
    assert not allowed[1][doc1_start, doc1_start - 1]  # no attention across packed documents


@pytest.mark.parametrize("separation", ["deep", "ffn"])
def test_reference_with_swapped_weight_sets_disagrees(tmp_path, separation):
    """Guards the main test: routing tokens through the other modality's set must change every output."""
    model = _model(tmp_path, separation)
    batch = _batch(model.arch.vocab_size)
    got, ref = _run(model, separation, batch, swap_sets=True)
    for name in ("logits", "special_logits", "image_hidden", "noise_pred"):
        scale = max(1.0, ref[name].abs().max().item())
        diff = (got[name].double() - ref[name].double()).abs().max().item()
        assert diff > 1e-2 * scale, f"{name}: swapped sets differ by only {diff:.3g}"
