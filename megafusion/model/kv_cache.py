"""Per-layer key/value cache for incremental decoding and for reusing a prompt across denoising steps.

A KVCache is immutable: a cached forward returns a *new* cache (old + new tokens) and leaves the one it read
untouched. That is what diffusion sampling needs (every denoising step attends to the same prompt cache and
must not grow it) and what classifier-free guidance and interleaving need (one prefix, several continuations).

Keys are stored after RoPE, at the model's num_kv_heads (GQA is expanded inside attention, never here).
Beside the tensors the cache keeps the layout of the cached tokens (document, image id, position), which is all
the hybrid mask needs to decide what a new token may see. Left padding of a batch is expressed as a separate
document (PAD_DOC), so padded keys are invisible to real tokens through the ordinary same-document rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from megafusion.model.hybrid_mask import CachedHybridMask, HybridMask
from megafusion.model.layout import TokenLayout, positions_from_documents

# Document id of left padding: no real token is in this document, so no real token attends to a pad.
PAD_DOC = -1


@dataclass(frozen=True)
class KVCache:
    keys: tuple[torch.Tensor, ...]  # per layer (B, H_kv, L, D), post-RoPE
    values: tuple[torch.Tensor, ...]  # per layer (B, H_kv, L, D)
    doc_ids: torch.Tensor  # (B, L); PAD_DOC marks left padding
    image_ids: torch.Tensor  # (B, L); -1 for text, else an id unique within the cache
    position_ids: torch.Tensor  # (B, L) RoPE positions the keys were rotated with

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values):
            raise ValueError(f"KVCache: {len(self.keys)} key tensors but {len(self.values)} value tensors")
        shape = tuple(self.doc_ids.shape)
        for name in ("image_ids", "position_ids"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"KVCache: {name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")
        for k, v in zip(self.keys, self.values, strict=True):
            if k.shape != v.shape or (k.shape[0], k.shape[2]) != shape:
                raise ValueError(f"KVCache: key/value shapes {tuple(k.shape)}/{tuple(v.shape)} do not match {shape}")

    @property
    def batch_size(self) -> int:
        return self.doc_ids.shape[0]

    def __len__(self) -> int:
        return self.doc_ids.shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def next_image_id(self) -> int:
        """First image id free for a new chunk, so a new image is never mistaken for a cached one."""
        return int(self.image_ids.max().item()) + 1 if len(self) else 0

    def select(self, rows: torch.Tensor | Sequence[int]) -> KVCache:
        """The cache of the given batch rows (repeats allowed, e.g. to sample several images per prompt)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.doc_ids.device)
        return KVCache(
            tuple(k.index_select(0, rows) for k in self.keys),
            tuple(v.index_select(0, rows) for v in self.values),
            self.doc_ids.index_select(0, rows),
            self.image_ids.index_select(0, rows),
            self.position_ids.index_select(0, rows),
        )

    def pad_left(self, length: int) -> KVCache:
        """Left-pad to `length` with PAD_DOC entries (zero keys/values, never attended by real tokens)."""
        pad = length - len(self)
        if pad < 0:
            raise ValueError(f"cannot pad a cache of length {len(self)} to {length}")
        if pad == 0:
            return self

        def left(t: torch.Tensor, fill: int, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = pad
            return torch.cat((t.new_full(shape, fill), t), dim=dim)

        return KVCache(
            tuple(left(k, 0, 2) for k in self.keys),
            tuple(left(v, 0, 2) for v in self.values),
            left(self.doc_ids, PAD_DOC, 1),
            left(self.image_ids, -1, 1),
            left(self.position_ids, 0, 1),
        )

    @staticmethod
    def cat_batch(caches: Sequence[KVCache]) -> KVCache:
        """Stack caches of possibly different lengths along the batch, left-padding the shorter ones. Image ids
        are shifted so that images of different caches stay distinct."""
        if not caches:
            raise ValueError("cat_batch needs at least one cache")
        length = max(len(c) for c in caches)
        padded, offset = [], 0
        for c in caches:
            p = c.pad_left(length)
            image_ids = torch.where(p.image_ids >= 0, p.image_ids + offset, p.image_ids)
            padded.append(KVCache(p.keys, p.values, p.doc_ids, image_ids, p.position_ids))
            offset += c.next_image_id
        return KVCache(
            tuple(torch.cat(ks, dim=0) for ks in zip(*(p.keys for p in padded), strict=True)),
            tuple(torch.cat(vs, dim=0) for vs in zip(*(p.values for p in padded), strict=True)),
            torch.cat([p.doc_ids for p in padded]),
            torch.cat([p.image_ids for p in padded]),
            torch.cat([p.position_ids for p in padded]),
        )

    def continuation_positions(self, doc_ids: torch.Tensor) -> torch.Tensor:
        """Positions of new tokens with these `doc_ids` (B, S): tokens that stay in the document of the last
        cached token continue its positions, a new document restarts at 0 (as in training's packing)."""
        if len(self) == 0:
            return positions_from_documents(doc_ids)
        docs = torch.cat((self.doc_ids[:, -1:], doc_ids), dim=1)
        rel = positions_from_documents(docs)[:, 1:]
        steps = torch.arange(1, doc_ids.shape[1] + 1, device=doc_ids.device)
        continuing = rel == steps
        return torch.where(continuing, self.position_ids[:, -1:] + rel, rel)


def cached_doc_ids(
    input_ids: torch.Tensor, doc_ids: torch.Tensor | None, past: KVCache | None, num_layers: int
) -> torch.Tensor | None:
    """Document ids of a chunk: given ones, else (with a cache) the last cached token's document."""
    if past is None:
        return doc_ids
    if past.batch_size != input_ids.shape[0]:
        raise ValueError(f"kv_cache holds {past.batch_size} rows but input_ids has {input_ids.shape[0]}")
    if past.num_layers != num_layers:
        raise ValueError(f"kv_cache has {past.num_layers} layers, the model {num_layers}")
    if doc_ids is not None or len(past) == 0:
        return doc_ids
    return past.doc_ids[:, -1:].expand_as(input_ids)


def chunk_mask(layout: TokenLayout, past: KVCache | None) -> tuple[HybridMask, torch.Tensor]:
    """The chunk's mask, and its image ids made unique against the cache's (chunk-local ids restart at 0)."""
    if past is None:
        return HybridMask(layout), layout.image_ids
    offset = past.next_image_id
    image_ids = torch.where(layout.image_ids >= 0, layout.image_ids + offset, layout.image_ids)
    mask = CachedHybridMask(replace(layout, image_ids=image_ids), past.doc_ids, past.image_ids)
    return mask, image_ids


def extend_cache(
    past: KVCache | None,
    kv: list[tuple[torch.Tensor, torch.Tensor]],
    layout: TokenLayout,
    image_ids: torch.Tensor,
) -> KVCache:
    """The cache of past + this chunk. Layers already concatenated past + new keys for attention; only the layout
    rows are appended here."""

    def extend(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        return new if old is None else torch.cat((old, new), dim=1)

    return KVCache(
        tuple(k for k, _ in kv),
        tuple(v for _, v in kv),
        extend(None if past is None else past.doc_ids, layout.doc_ids),
        extend(None if past is None else past.image_ids, image_ids),
        extend(None if past is None else past.position_ids, layout.position_ids),
    )
