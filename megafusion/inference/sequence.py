"""Building model inputs for inference: rows of text ids and clean images, left-padded into one cached prefill.

Sequence conventions shared by every inference mode (the training layout of Transfusion/LMFusion):
    text -> image     <prompt ids> BOI [image]
    image -> text     <prompt ids> BOI [image] EOI <caption ...>
    edit (sec. 5.2)   <ids> BOI [source] EOI <instruction ids> BOI [target] EOI
where BOI = model.boi_id and EOI = model.eoi_id (ids >= vocab_size), [image] is tokens_per_image image tokens,
and <ids> starts like a training document: the tokenizer's `prefix_ids` (a BOS where the tokenizer adds one),
then the plain encoding.
Images that are inputs (captioning, edit source, an image already generated) enter clean, at t = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megafusion.model import IMAGE, PAD_DOC, TEXT, KVCache, LlamaFusion

# One element of a row: token ids (text, BOI, EOI) or one clean latent image (C, H, W).
Item = Sequence[int] | torch.Tensor


@dataclass
class PackedRows:
    input_ids: torch.Tensor  # (B, S), left-padded
    modality: torch.Tensor  # (B, S)
    doc_ids: torch.Tensor  # (B, S); PAD_DOC on padding so no real token sees it
    images: torch.Tensor | None  # (N, C, H, W) clean latents in row-major order, or None


def pack_rows(model: LlamaFusion, rows: Sequence[Sequence[Item]]) -> PackedRows:
    """Left-pad rows to one batch. Left, so every row's last token is in the last column and decoding
    continues all rows at the same cache length."""
    n = model.image_config.tokens_per_image
    device = model.embed_tokens.weight.device
    ids_rows, mod_rows, images = [], [], []
    for row in rows:
        ids: list[int] = []
        mods: list[int] = []
        for item in row:
            if isinstance(item, torch.Tensor):
                images.append(item)
                ids += [0] * n
                mods += [IMAGE] * n
            else:
                ids += [int(t) for t in item]
                mods += [TEXT] * len(item)
        if not ids:
            raise ValueError("an inference row must hold at least one token")
        ids_rows.append(ids)
        mod_rows.append(mods)
    length = max(len(r) for r in ids_rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    modality = torch.full_like(input_ids, TEXT)
    doc_ids = torch.full_like(input_ids, PAD_DOC)
    for b, (ids, mods) in enumerate(zip(ids_rows, mod_rows, strict=True)):
        input_ids[b, length - len(ids) :] = torch.tensor(ids)
        modality[b, length - len(ids) :] = torch.tensor(mods)
        doc_ids[b, length - len(ids) :] = 0
    stacked = torch.stack([im.to(device) for im in images]) if images else None
    return PackedRows(input_ids.to(device), modality.to(device), doc_ids.to(device), stacked)


@dataclass
class Step:
    """The cache after a forward, and the next-token logits of each row's last token: (B, vocab + 2) over
    [base vocabulary | BOI, EOI], or None when the last token is an image token."""

    cache: KVCache
    logits: torch.Tensor | None


def forward_step(
    model: LlamaFusion,
    cache: KVCache | None,
    input_ids: torch.Tensor,
    modality: torch.Tensor,
    images: torch.Tensor | None = None,
    doc_ids: torch.Tensor | None = None,
) -> Step:
    """Run new tokens on top of `cache` (None: a fresh prefill), images clean (t = 0), and grow the cache.
    Only the last token's logits are computed: no (B, S, vocab) tensor for a long prompt."""
    timesteps = None
    if images is not None:
        timesteps = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    out = model(input_ids, modality, doc_ids=doc_ids, images=images, timesteps=timesteps, compute_logits=False,
                kv_cache=cache, use_cache=True)
    logits = None
    if bool((modality[:, -1] == TEXT).all()):
        batch, seq = input_ids.shape
        # text_index is sorted (text rows stay in sequence order), so each row's last token is found by search.
        last = torch.arange(batch, device=input_ids.device) * seq + seq - 1
        rows = torch.searchsorted(out.text_index, last)
        text_logits, special = model.lm_logits(out.text_hidden.index_select(0, rows))
        logits = torch.cat((text_logits, special), dim=-1).float()
    return Step(out.kv_cache, logits)


def prefill(model: LlamaFusion, rows: Sequence[Sequence[Item]]) -> Step:
    """One cached forward over whole prompt rows (left-padded, images clean)."""
    packed = pack_rows(model, rows)
    return forward_step(model, None, packed.input_ids, packed.modality, packed.images, packed.doc_ids)


def feed_tokens(model: LlamaFusion, cache: KVCache, ids: torch.Tensor) -> Step:
    """Append text ids (B, k) (BOI/EOI included) to the cache."""
    return forward_step(model, cache, ids, torch.full_like(ids, TEXT))


def image_chunk(model: LlamaFusion, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, modality) of one image per row: the tokens a denoising step runs on top of the cache."""
    n = model.image_config.tokens_per_image
    device = model.embed_tokens.weight.device
    modality = torch.full((batch, n), IMAGE, dtype=torch.long, device=device)
    return torch.zeros_like(modality), modality


def append_clean_image(model: LlamaFusion, cache: KVCache, latents: torch.Tensor, then: Sequence[int] = ()) -> Step:
    """Append one clean (t = 0) image per row, followed by the text ids `then` (e.g. EOI), to the cache."""
    ids, modality = image_chunk(model, cache.batch_size)
    if then:
        tail = torch.tensor(list(then), dtype=torch.long, device=ids.device).expand(cache.batch_size, -1)
        ids = torch.cat((ids, tail), dim=1)
        modality = torch.cat((modality, torch.full_like(tail, TEXT)), dim=1)
    return forward_step(model, cache, ids, modality, latents.to(model.embed_tokens.weight.device))
