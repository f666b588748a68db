"""The KV cache in the model: cached mask rows, chunked forwards equal one full forward, immutability."""

import pytest
import torch

from megafusion.model import PAD_DOC, CachedHybridMask, HybridMask, KVCache, LlamaFusion, TokenLayout
from megafusion.model.hybrid_mask import cached_hybrid_allowed
from tests.helpers import TINY_IMAGE, TINY_UNET, mixed_batch, save_tiny_llama

# (modality, doc, chunk boundaries); chunks never split an image (2 tokens per image here).
LAYOUTS = {
    "text-image-text": ([0, 0, 0, 1, 1, 0, 0], [0] * 7, [2, 5, 6]),
    "two-images": ([0, 1, 1, 0, 0, 1, 1, 0], [0] * 8, [1, 3, 4, 7]),
    "image-first": ([1, 1, 0, 0, 0], [0] * 5, [2, 3]),
    "adjacent-images": ([0, 1, 1, 1, 1, 0], [0] * 6, [1, 3, 5]),
    "left-padded": ([0, 0, 0, 1, 1, 0, 0], [PAD_DOC, PAD_DOC, 0, 0, 0, 0, 0], [1, 3, 5]),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_cached_mask_equals_dense_mask_rows(name):
    modality, doc, cuts = LAYOUTS[name]
    full = TokenLayout.build(torch.zeros(1, len(modality), dtype=torch.long), torch.tensor([modality]),
                             doc_ids=torch.tensor([doc]), tokens_per_image=2)
    dense = HybridMask(full).dense()
    for a, b in zip([0, *cuts], [*cuts, len(modality)], strict=True):
        chunk = TokenLayout(full.modality[:, a:b], full.image_ids[:, a:b], full.doc_ids[:, a:b],
                            full.position_ids[:, a:b])
        mask = CachedHybridMask(chunk, full.doc_ids[:, :a], full.image_ids[:, :a])
        assert torch.equal(mask.dense(), dense[:, a:b, :b]), (a, b)
        assert not mask.is_causal_only or a == 0
    assert torch.equal(cached_hybrid_allowed(full.doc_ids[:, :0], full.image_ids[:, :0], full.doc_ids,
                                             full.image_ids), dense)


def _model(tmp_path, separation="deep"):
    save_tiny_llama(tmp_path, "gqa-untied")
    return LlamaFusion.from_llama(tmp_path, separation=separation, image=TINY_IMAGE, unet=TINY_UNET).eval()


@pytest.mark.parametrize("separation", ["deep", "ffn", "none"])
def test_chunked_cached_forward_equals_full_forward(tmp_path, separation):
    """Row 0: 5 text, BOI, 4 image, EOI, 3 text; row 1: BOI, 4 image, EOI, 8 text. Chunks: [0,1) [1,10) [10,12)
    [12,14); the middle chunk holds both images (chunk-local image ids), the last ones are text."""
    model = _model(tmp_path, separation)
    b = mixed_batch(97, TINY_IMAGE)
    ids, mod = b["input_ids"], b["modality"]
    with torch.no_grad():
        full = model(ids, mod, images=b["images"], timesteps=b["timesteps"])
        cache, logits, noise = None, [], None
        for lo, hi in ((0, 1), (1, 10), (10, 12), (12, 14)):
            has_img = bool(mod[:, lo:hi].any())
            out = model(ids[:, lo:hi], mod[:, lo:hi], images=b["images"] if has_img else None,
                        timesteps=b["timesteps"] if has_img else None, kv_cache=cache, use_cache=True)
            cache = out.kv_cache
            logits.append(out.logits)
            noise = out.noise_pred if has_img else noise
    assert len(cache) == ids.shape[1]
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(noise, full.noise_pred, atol=1e-5, rtol=0)
    assert cache.position_ids.tolist() == [list(range(14))] * 2


def test_forward_leaves_the_cache_it_reads_unchanged(tmp_path):
    model = _model(tmp_path)
    ids = torch.tensor([[1, 7, 8, 9]])
    with torch.no_grad():
        cache = model(ids, use_cache=True).kv_cache
        keys = [k.clone() for k in cache.keys]
        a = model(torch.tensor([[5]]), kv_cache=cache, use_cache=True)
        b = model(torch.tensor([[5]]), kv_cache=cache)
    assert len(cache) == 4 and len(a.kv_cache) == 5 and b.kv_cache is None
    assert all(torch.equal(k, k0) for k, k0 in zip(cache.keys, keys, strict=True))
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)


def test_left_padding_is_invisible(tmp_path):
    """A row left-padded as its own document gives the same logits as the row alone, now and after a step."""
    model = _model(tmp_path)
    row = torch.tensor([[1, 11, 12, 13]])
    padded = torch.tensor([[0, 0, 1, 11, 12, 13]])
    doc = torch.tensor([[PAD_DOC, PAD_DOC, 0, 0, 0, 0]])
    with torch.no_grad():
        alone = model(row, use_cache=True)
        pad = model(padded, doc_ids=doc, use_cache=True)
        torch.testing.assert_close(pad.logits[:, 2:], alone.logits, atol=1e-5, rtol=0)
        nxt = torch.tensor([[40]])
        a = model(nxt, kv_cache=alone.kv_cache)
        p = model(nxt, kv_cache=pad.kv_cache)
    torch.testing.assert_close(p.logits, a.logits, atol=1e-5, rtol=0)


def test_cache_cat_batch_and_select(tmp_path):
    model = _model(tmp_path)
    with torch.no_grad():
        a = model(torch.tensor([[1, 5, 6, 7, 8]]), use_cache=True).kv_cache
        b = model(torch.tensor([[1, 9]]), use_cache=True).kv_cache
        both = KVCache.cat_batch([a, b])
        nxt = torch.tensor([[3], [3]])
        got = model(nxt, kv_cache=both).logits
        ref_b = model(nxt[:1], kv_cache=b).logits
        ref_a = model(nxt[:1], kv_cache=a).logits
    assert both.batch_size == 2 and len(both) == 5 and both.doc_ids[1].tolist() == [PAD_DOC] * 3 + [0, 0]
    torch.testing.assert_close(got[1:], ref_b, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:1], ref_a, atol=1e-5, rtol=0)
    assert torch.equal(both.select([1, 1]).keys[0][0], both.keys[0][1])


def test_mismatched_cache_is_rejected(tmp_path):
    model = _model(tmp_path)
    with torch.no_grad():
        cache = model(torch.tensor([[1, 5]]), use_cache=True).kv_cache
        with pytest.raises(ValueError, match="kv_cache holds 1 rows"):
            model(torch.tensor([[3], [4]]), kv_cache=cache)
