"""The id-based tile classification shared by the Triton kernel, the FlexAttention block mask and the benchmark:
never skips a tile that holds an allowed pair, never calls a tile full unless every pair is allowed."""

import pytest
import torch

from megafusion.kernels.reference import dense_hybrid_mask
from megafusion.kernels.tile_map import build_tile_map, exact_tile_map
from tests.kernels.layouts import LAYOUTS, layout_ids


def _random_ids(seed: int, batch: int = 3, seq: int = 70) -> tuple[torch.Tensor, torch.Tensor]:
    """Arbitrary ids: document ids in any order (also repeating, and -1 as left padding uses), images of random
    length, so the range summaries really are only conservative here."""
    g = torch.Generator().manual_seed(seed)
    doc = torch.randint(-1, 3, (batch, seq // 7), generator=g).repeat_interleave(7, dim=1)
    img = torch.full((batch, seq), -1)
    next_id = 0
    for b in range(batch):
        pos = int(torch.randint(0, 10, (), generator=g))
        while pos < seq:
            length = int(torch.randint(1, 20, (), generator=g))
            if bool(torch.rand((), generator=g) < 0.5):
                img[b, pos : pos + length] = next_id
                next_id += 1
            pos += length + int(torch.randint(0, 6, (), generator=g))
    return doc, img


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("block_m, block_n", [(8, 8), (16, 8), (8, 32)])
def test_conservative_on_arbitrary_ids(seed, block_m, block_n):
    doc, img = _random_ids(seed)
    past = 11 * (seed % 2)  # odd seeds: queries after cached keys
    tiles = build_tile_map(doc[:, past:], img[:, past:], doc, img, block_m, block_n)
    visit, full = exact_tile_map(dense_hybrid_mask(doc[:, past:], img[:, past:], doc, img), block_m, block_n)
    assert not bool((visit & ~tiles.visit).any()), "a tile holding an allowed pair was skipped"
    assert not bool((tiles.full & ~full).any()), "a tile called full holds a masked pair"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("block", [8, 16, 64])
def test_exact_skips_on_packed_layouts(name, block):
    """Contiguous documents and images (what packing produces): the visited tiles are exactly the non-empty ones."""
    doc, img = layout_ids(LAYOUTS[name])
    tiles = build_tile_map(doc, img, doc, img, block, block)
    visit, full = exact_tile_map(dense_hybrid_mask(doc, img, doc, img), block, block)
    assert torch.equal(tiles.visit, visit)
    assert not bool((tiles.full & ~full).any())


def test_ordered_lists_match_the_tile_matrix():
    doc, img = layout_ids(LAYOUTS["two-rows"])
    t = build_tile_map(doc, img, doc, img, 8, 16)
    for b in range(doc.shape[0]):
        for m in range(t.visit.shape[1]):
            n = int(t.kv_count[b, m])
            assert sorted(t.kv_index[b, m, :n].tolist()) == torch.nonzero(t.visit[b, m]).flatten().tolist()
            assert t.kv_full[b, m, :n].bool().tolist() == t.full[b, m, t.kv_index[b, m, :n].long()].tolist()
        for k in range(t.visit.shape[2]):
            n = int(t.q_count[b, k])
            assert t.q_index[b, k, :n].tolist() == torch.nonzero(t.visit[b, :, k]).flatten().tolist()


def test_causal_text_skips_the_upper_triangle():
    doc = torch.zeros(1, 256, dtype=torch.long)
    tiles = build_tile_map(doc, doc - 1, doc, doc - 1, 64, 64)
    assert tiles.skipped_fraction() == pytest.approx(6 / 16)  # 4x4 tiles, 6 strictly above the diagonal
    assert tiles.full_fraction() == pytest.approx(6 / 16)  # strictly below the diagonal
