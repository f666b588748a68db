"""Rows no trainable parameter can reach, split off so training runs them without autograd.

With the text path frozen, a text token's hidden states, keys and values depend only on frozen weights unless
something trainable lies at or before it in its own document: an image (trainable U-Net down and image set) or a
BOI/EOI token (trainable embedding rows). Attention from such a row reaches only earlier rows of its document,
which are frozen-only too, so the frozen rows are closed under attention: they can run as their own no-grad pass
(original positions and document ids kept), and the remaining rows attend to their keys and values as to a KV
cache of past tokens. The frozen rows need not be a prefix of the packed row (the caption of the second of two
packed documents is mid-row); treating them all as "past" keys is still exact, because a frozen key a later row
may see lies in that row's document and therefore before it, where the mask rule allows it.

Each pass packs its rows to the left of every batch row, in order; the shorter rows' right padding is a document
of its own that no weight set processes (ModalityRouter's `valid`) and no real token sees. Backward work then
shrinks to the rows that can learn; the gradients are those of the full computation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megafusion.model.kv_cache import PAD_DOC
from megafusion.model.layout import IMAGE, TEXT, TokenLayout


def frozen_rows(input_ids: torch.Tensor, layout: TokenLayout, vocab_size: int) -> torch.Tensor:
    """(B, S) bool: text rows of base-vocabulary tokens with no image and no BOI/EOI at or before them in their
    document. (Documents are matched by id, so a document split into several runs of a row is handled too.)"""
    batch, seq = input_ids.shape
    seed = (layout.modality == IMAGE) | (input_ids >= vocab_size)
    # One group per (row, document): the first seed of the group; every row at or after it can learn.
    _, group = torch.unique(layout.doc_ids + torch.arange(batch, device=input_ids.device)[:, None]
                            * (int(layout.doc_ids.max()) - int(layout.doc_ids.min()) + 1), return_inverse=True)
    pos = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    first_seed = torch.full((int(group.max()) + 1,), seq, dtype=torch.long, device=input_ids.device)
    first_seed.scatter_reduce_(0, group[seed], pos[seed], reduce="amin")
    return pos < first_seed[group]


@dataclass(frozen=True)
class RowSelection:
    """Some rows of each batch row, packed to the left in their original order: `index` (B, L) positions in the
    original rows, `valid` (B, L) False on the right padding of rows that hold fewer than L of them."""

    index: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def of(cls, chosen: torch.Tensor) -> RowSelection:
        counts = chosen.sum(1)
        length = int(counts.max()) if chosen.numel() else 0
        # A stable sort puts the chosen positions first, in sequence order.
        order = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :length]
        valid = torch.arange(length, device=chosen.device)[None, :] < counts[:, None]
        return cls(order, valid)

    def gather(self, t: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.where(self.valid, t.gather(1, self.index), torch.full_like(self.index, fill))

    def layout(self, layout: TokenLayout) -> TokenLayout:
        """The selected rows' layout. Padding is a text token of its own document (PAD_DOC): no real token sees it,
        it sees itself (no empty softmax row), and it is no image."""
        return TokenLayout(
            self.gather(layout.modality, TEXT),
            self.gather(layout.image_ids, -1),
            self.gather(layout.doc_ids, PAD_DOC),
            self.gather(layout.position_ids, 0),
        )


@dataclass(frozen=True)
class FrozenSplit:
    """A batch cut into its frozen rows (run first, without autograd) and the rows that can learn."""

    frozen: torch.Tensor  # (B, S) bool, the original rows that run without autograd
    frozen_rows: RowSelection
    learning_rows: RowSelection

    @classmethod
    def of(cls, input_ids: torch.Tensor, layout: TokenLayout, vocab_size: int) -> FrozenSplit | None:
        """None when there is nothing to split off, or nothing left that can learn (the full computation then
        runs, as it always has: every block stays in the backward, which data-parallel engines rely on)."""
        if layout.doc_ids.numel() == 0 or bool((layout.doc_ids < 0).any()):
            return None  # padding documents are the KV cache's; training batches hold none
        frozen = frozen_rows(input_ids, layout, vocab_size)
        if not bool(frozen.any()) or bool(frozen.all()):
            return None
        return cls(frozen, RowSelection.of(frozen), RowSelection.of(~frozen))
