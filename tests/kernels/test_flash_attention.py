"""The Triton hybrid-mask FlashAttention (forward, log-sum-exp, backward) against SDPA under HybridMask-style
dense masks, run on CPU through Triton's interpreter (fp32 only: the interpreter has no bf16)."""

import os

# Must be set before triton is imported (kernels are created as interpreted functions at import).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton); the Triton kernels are optional")

from megafusion.kernels import build_tile_map, hybrid_flash_attention, reference_attention  # noqa: E402
from megafusion.kernels.reference import reference_attention_lse  # noqa: E402
from tests.kernels.layouts import LAYOUTS, layout_ids, rel_err  # noqa: E402

TILE = 16
HEAD_DIM = 16


def _qkv(batch: int, heads: int, kv_heads: int, q_len: int, kv_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, HEAD_DIM, generator=g).requires_grad_(True)
    k = torch.randn(batch, kv_heads, kv_len, HEAD_DIM, generator=g).requires_grad_(True)
    v = torch.randn(batch, kv_heads, kv_len, HEAD_DIM, generator=g).requires_grad_(True)
    return q, k, v


def _check(q, k, v, q_doc, q_img, kv_doc, kv_img, block_m=TILE, block_n=TILE):
    out, lse = hybrid_flash_attention(q, k, v, q_doc, q_img, kv_doc, kv_img, block_m=block_m, block_n=block_n)
    ref = reference_attention(q, k, v, q_doc, q_img, kv_doc, kv_img)
    assert rel_err(out, ref) < 1e-4
    assert rel_err(lse, reference_attention_lse(q, k, q_doc, q_img, kv_doc, kv_img)) < 1e-4
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want, strict=True):
        assert rel_err(a, b) < 1e-4, f"d{name}: relative error {rel_err(a, b):.2e}"


@pytest.mark.parametrize(
    "name, heads, kv_heads",
    [
        ("text-image-text", 2, 2),
        ("several-images", 4, 2),
        ("image-first", 2, 1),
        ("packed-documents", 4, 2),
        ("text-only", 2, 1),
        ("two-rows", 4, 1),
    ],
)
def test_matches_sdpa_with_dense_mask(name, heads, kv_heads):
    doc, img = layout_ids(LAYOUTS[name])
    batch, seq = doc.shape
    assert seq % TILE, "layouts are chosen so the length is not a multiple of the tile"
    q, k, v = _qkv(batch, heads, kv_heads, seq, seq)
    _check(q, k, v, doc, img, doc, img)


def test_rectangular_tiles():
    doc, img = layout_ids(LAYOUTS["packed-documents"])
    q, k, v = _qkv(1, 2, 1, doc.shape[1], doc.shape[1], seed=1)
    _check(q, k, v, doc, img, doc, img, block_m=16, block_n=32)


def test_queries_after_cached_keys():
    """KV-cache shape: the last S_q tokens attend to [cached + new] keys (the new chunk holds a whole image)."""
    doc, img = layout_ids([[("t", 9), ("i", 12), ("t", 6), ("i", 16), ("t", 3)]])
    past = 27
    q, k, v = _qkv(1, 4, 2, doc.shape[1] - past, doc.shape[1], seed=2)
    _check(q, k, v, doc[:, past:], img[:, past:], doc, img)


def test_non_contiguous_inputs_as_the_model_passes_them():
    """FusionBlock hands over (B, S, H, D) storage transposed to (B, H, S, D)."""
    doc, img = layout_ids(LAYOUTS["text-image-text"])
    seq = doc.shape[1]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, seq, 2, HEAD_DIM, generator=g).transpose(1, 2).requires_grad_(True)
    k = torch.randn(1, seq, 1, HEAD_DIM, generator=g).transpose(1, 2).requires_grad_(True)
    v = torch.randn(1, seq, 1, HEAD_DIM, generator=g).transpose(1, 2).requires_grad_(True)
    assert not q.is_contiguous()
    _check(q, k, v, doc, img, doc, img)


def test_layouts_exercise_skipped_full_and_partial_tiles():
    """The kernel's three tile paths (skip, unmasked, masked) all occur in the layouts tested above."""
    kinds = torch.zeros(3, dtype=torch.bool)
    for rows in LAYOUTS.values():
        doc, img = layout_ids(rows)
        tiles = build_tile_map(doc, img, doc, img, TILE, TILE)
        kinds |= torch.stack([(~tiles.visit).any(), tiles.full.any(), (tiles.visit & ~tiles.full).any()])
    assert kinds.all()


def test_rejects_cpu_tensors_outside_the_interpreter(monkeypatch):
    doc, img = layout_ids(LAYOUTS["image-first"])
    q, k, v = _qkv(1, 2, 2, doc.shape[1], doc.shape[1])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        hybrid_flash_attention(q, k, v, doc, img, doc, img)
