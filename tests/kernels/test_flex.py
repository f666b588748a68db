"""The FlexAttention backend: one mask_mod from hybrid_allowed, a BlockMask built from the ids (same tile logic as
the Triton kernel), eager (autograd) and compiled (CPU forward) FlexAttention against SDPA with the dense mask."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from megafusion.kernels.flex import FLEX_BLOCK, flex_hybrid_attention, flex_layout, hybrid_block_mask, hybrid_mask_mod
from megafusion.kernels.reference import dense_hybrid_mask, reference_attention
from tests.kernels.layouts import LAYOUTS, layout_ids, rel_err

# torch.compile internals call a deprecated torch.jit API; nothing here to act on.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")


def _long_layout() -> tuple[torch.Tensor, torch.Tensor]:
    """Two packed documents over 300 tokens (3 flex blocks, the last one partial), 64-token images."""
    return layout_ids([[("t", 20), ("i", 64), ("t", 50), ("doc",), ("i", 64), ("t", 30), ("i", 64), ("t", 8)]])


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_mask_mod_is_the_hybrid_rule(name):
    doc, img = layout_ids(LAYOUTS[name])
    batch, seq = doc.shape
    dense = create_mask(hybrid_mask_mod(doc, img, doc, img), batch, None, seq, seq, device="cpu")
    assert torch.equal(dense[:, 0], dense_hybrid_mask(doc, img, doc, img))


@pytest.mark.parametrize("past", [0, 100])
def test_block_mask_from_ids_equals_create_block_mask(past):
    """Same partial/full blocks as FlexAttention's own builder, which evaluates mask_mod on all S x S pairs."""
    doc, img = _long_layout()
    qd, qi = doc[:, past:], img[:, past:]
    ours = hybrid_block_mask(qd, qi, doc, img)
    theirs = create_block_mask(hybrid_mask_mod(qd, qi, doc, img), 1, None, qd.shape[1], doc.shape[1], device="cpu")
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    full = lambda bm: bm.full_kv_num_blocks  # noqa: E731
    assert torch.equal(full(ours), full(theirs))


@pytest.mark.parametrize("past, heads, kv_heads", [(0, 4, 2), (100, 2, 1)])
def test_eager_forward_and_cpu_backward_match_sdpa(past, heads, kv_heads):
    """Eager FlexAttention forward; FlexAttention has no CPU backward, ours recomputes over the visited tiles."""
    doc, img = _long_layout()
    seq = doc.shape[1]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, seq - past, 16, generator=g).requires_grad_(True)
    k = torch.randn(1, kv_heads, seq, 16, generator=g).requires_grad_(True)
    v = torch.randn(1, kv_heads, seq, 16, generator=g).requires_grad_(True)
    ids = (doc[:, past:], img[:, past:], doc, img)
    out = flex_hybrid_attention(q, k, v, flex_layout(*ids), compile=False)
    ref = reference_attention(q, k, v, *ids)
    assert rel_err(out, ref) < 1e-4
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad), strict=True):
        assert rel_err(a, b) < 1e-4


@pytest.mark.slow
def test_compiled_cpu_forward_and_backward_match_sdpa():
    """torch.compile'd FlexAttention on CPU, without autograd and with it (compiled forward, our CPU backward).
    Slow: each first compile takes 20-30 s on 2 cores (a few seconds once the inductor cache is warm)."""
    doc, img = _long_layout()
    seq = doc.shape[1]
    assert seq % FLEX_BLOCK
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, seq, 16, generator=g).requires_grad_(True) for _ in range(3))
    layout = flex_layout(doc, img, doc, img)
    ref = reference_attention(q, k, v, doc, img, doc, img)
    with torch.no_grad():
        assert rel_err(flex_hybrid_attention(q, k, v, layout, compile=True), ref) < 1e-4
    out = flex_hybrid_attention(q, k, v, layout, compile=True)
    assert rel_err(out, ref) < 1e-4
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad), strict=True):
        assert rel_err(a, b) < 1e-4
