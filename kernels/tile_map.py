"""Which (query tile, key tile) pairs of the hybrid mask hold any allowed pair: the skip logic shared by the Triton
kernel, the FlexAttention block mask and the benchmark.

The rule (see `megafusion.kernels.mask_rule`) is: same document AND (key index <= query index OR same image).
Instead of looking at the S x S mask, every tile is summarised by a handful of per-tile reductions of the ids
(O(S) work): min/max document id, min/max image id over its image tokens, its first/last sequence index, and
whether it is one complete image. A pair of tiles is then

* empty   if the document ranges are disjoint, or every key comes after every query and the image ranges
          are disjoint (no causal pair and no shared image): the kernel never loads it;
* full    if both tiles are complete (no padding rows/columns), lie in one and the same document, and either every
          key precedes every query or both tiles are wholly inside the same image: no element mask is needed;
* partial otherwise: the kernel evaluates the rule element by element from the ids.

Ranges make the test conservative (a tile may be visited although it is empty, e.g. documents 0 and 2 around
document 1), never wrong: an allowed pair always implies overlapping document ranges and either a causal pair or
overlapping image ranges, and "full" is only claimed when every pair provably passes. For the layouts packing
produces (contiguous documents, contiguous images) the skipped set is exact (tested); "full" may still miss a
diagonal tile whose later keys all share the query's image (it is then computed with the element mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_BIG = torch.iinfo(torch.int64).max
_SMALL = torch.iinfo(torch.int64).min


@dataclass(frozen=True)
class TileSummary:
    """Per-tile reductions of the ids of one side (queries or keys), each (B, num_tiles)."""

    doc_min: torch.Tensor
    doc_max: torch.Tensor
    img_min: torch.Tensor  # over image tokens; _BIG when the tile holds none
    img_max: torch.Tensor  # over image tokens; _SMALL when the tile holds none
    idx_min: torch.Tensor  # first sequence index (key coordinates)
    idx_max: torch.Tensor  # last valid sequence index
    complete: torch.Tensor  # no padding row/column in this tile
    one_image: torch.Tensor  # complete and every token belongs to the same image


def summarize_tiles(doc: torch.Tensor, img: torch.Tensor, block: int, first_index: int = 0) -> TileSummary:
    """doc, img: (B, S) ids; tiles of `block` tokens; token t sits at sequence index first_index + t."""
    batch, seq = doc.shape
    tiles = -(-seq // block)
    pad = tiles * block - seq
    doc, img = doc.long(), img.long()

    def tiled(t: torch.Tensor, fill: int | bool) -> torch.Tensor:
        # torch.cat, not F.pad: F.pad's fill goes through a float and int64 extremes do not survive that.
        filler = torch.full((batch, pad), fill, dtype=t.dtype, device=t.device)
        return torch.cat((t, filler), dim=1).view(batch, tiles, block)

    is_img = img >= 0
    img_lo = tiled(torch.where(is_img, img, torch.full_like(img, _BIG)), _BIG).amin(-1)
    img_hi = tiled(torch.where(is_img, img, torch.full_like(img, _SMALL)), _SMALL).amax(-1)
    start = torch.arange(tiles, device=doc.device) * block
    complete = ((start + block) <= seq).expand(batch, tiles)
    all_img = tiled(is_img, False).all(-1) & complete
    return TileSummary(
        doc_min=tiled(doc, _BIG).amin(-1),
        doc_max=tiled(doc, _SMALL).amax(-1),
        img_min=img_lo,
        img_max=img_hi,
        idx_min=(first_index + start).expand(batch, tiles),
        idx_max=(first_index + torch.clamp(start + block, max=seq) - 1).expand(batch, tiles),
        complete=complete,
        one_image=all_img & (img_lo == img_hi),
    )


def classify_tiles(q: TileSummary, k: TileSummary) -> tuple[torch.Tensor, torch.Tensor]:
    """(visit, full), each bool (B, query tiles, key tiles). full implies visit."""

    def col(t: torch.Tensor) -> torch.Tensor:
        return t[:, :, None]

    def row(t: torch.Tensor) -> torch.Tensor:
        return t[:, None, :]

    doc_overlap = (col(q.doc_min) <= row(k.doc_max)) & (row(k.doc_min) <= col(q.doc_max))
    some_causal = row(k.idx_min) <= col(q.idx_max)
    img_overlap = (col(q.img_min) <= row(k.img_max)) & (row(k.img_min) <= col(q.img_max))
    visit = doc_overlap & (some_causal | img_overlap)

    one_doc = (col(q.doc_min) == col(q.doc_max)) & (row(k.doc_min) == row(k.doc_max))
    same_doc = one_doc & (col(q.doc_min) == row(k.doc_min))
    all_causal = row(k.idx_max) <= col(q.idx_min)
    same_image = col(q.one_image) & row(k.one_image) & (col(q.img_min) == row(k.img_min))
    full = visit & same_doc & col(q.complete) & row(k.complete) & (all_causal | same_image)
    return visit, full


def _ordered(visit: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of tiles: how many to visit, their indices (visited first, ascending), and their full flags."""
    order = torch.argsort((~visit).to(torch.int8), dim=-1, stable=True)
    count = visit.sum(-1)
    return (
        count.to(torch.int32).contiguous(),
        order.to(torch.int32).contiguous(),
        full.gather(-1, order).to(torch.int32).contiguous(),
    )


@dataclass(frozen=True)
class TileMap:
    """Block-level view of the hybrid mask for one batch layout and one tile shape.

    Query tiles run over the S_q queries, key tiles over the S_k keys; queries are the last S_q tokens of the key
    sequence (S_q < S_k with a KV cache). The ordered forms are what the kernels read: the forward and the dQ
    pass walk `kv_index[b, m, :kv_count[b, m]]`, the dK/dV pass walks `q_index[b, n, :q_count[b, n]]`."""

    block_m: int
    block_n: int
    q_len: int
    kv_len: int
    visit: torch.Tensor  # (B, Mq, Nk) bool
    full: torch.Tensor  # (B, Mq, Nk) bool
    kv_count: torch.Tensor  # (B, Mq) int32
    kv_index: torch.Tensor  # (B, Mq, Nk) int32
    kv_full: torch.Tensor  # (B, Mq, Nk) int32, aligned with kv_index
    q_count: torch.Tensor  # (B, Nk) int32
    q_index: torch.Tensor  # (B, Nk, Mq) int32
    q_full: torch.Tensor  # (B, Nk, Mq) int32, aligned with q_index

    @property
    def num_tiles(self) -> int:
        return self.visit.numel()

    def skipped_fraction(self) -> float:
        """Fraction of all (query tile, key tile) pairs the kernel never loads."""
        return 1.0 - float(self.visit.float().mean())

    def full_fraction(self) -> float:
        """Fraction of all tile pairs computed without an element mask."""
        return float(self.full.float().mean())


def build_tile_map(
    q_doc: torch.Tensor,
    q_img: torch.Tensor,
    kv_doc: torch.Tensor,
    kv_img: torch.Tensor,
    block_m: int,
    block_n: int,
) -> TileMap:
    """Tile map from per-token ids: q_* (B, S_q), kv_* (B, S_k) with S_q <= S_k."""
    q_len, kv_len = q_doc.shape[1], kv_doc.shape[1]
    if q_len > kv_len:
        raise ValueError(f"queries ({q_len}) must be the last tokens of the keys ({kv_len})")
    q_sum = summarize_tiles(q_doc, q_img, block_m, first_index=kv_len - q_len)
    k_sum = summarize_tiles(kv_doc, kv_img, block_n)
    visit, full = classify_tiles(q_sum, k_sum)
    kv_count, kv_index, kv_full = _ordered(visit, full)
    q_count, q_index, q_full = _ordered(visit.transpose(1, 2), full.transpose(1, 2))
    return TileMap(block_m, block_n, q_len, kv_len, visit, full, kv_count, kv_index, kv_full, q_count, q_index, q_full)


def exact_tile_map(dense: torch.Tensor, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(visit, full) from a materialised (B, S_q, S_k) mask, the ground truth the id-based map is tested against.
    Padding rows/columns count as masked, so edge tiles are never full (as in FlexAttention's own builder)."""
    b, sq, sk = dense.shape
    mq, nk = -(-sq // block_m), -(-sk // block_n)
    padded = torch.zeros(b, mq * block_m, nk * block_n, dtype=torch.bool, device=dense.device)
    padded[:, :sq, :sk] = dense
    counts = padded.view(b, mq, block_m, nk, block_n).sum(dim=(2, 4))
    return counts > 0, counts == block_m * block_n
