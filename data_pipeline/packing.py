"""Turning (caption, latent) samples into fixed-length packed sequences the model's hybrid mask consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100
TEXT, IMAGE = 0, 1


@dataclass
class Document:
    """One sample laid out as tokens: [prefix] caption BOI image EOI EOS, or [prefix] BOI image EOI caption EOS,
    where prefix is what the tokenizer itself puts before a text (BOS for Llama, nothing for SmolLM2)."""

    key: str
    input_ids: list[int]
    modality: list[int]
    latent: torch.Tensor
    image_first: bool

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PackedSequence:
    input_ids: torch.Tensor
    modality: torch.Tensor
    doc_ids: torch.Tensor
    labels: torch.Tensor
    latents: list[torch.Tensor] = field(default_factory=list)
    image_first: list[bool] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    # (reader id, samples skipped, shards damaged) of the reader that emitted it, cumulative (loader.py).
    reader_health: tuple[int, int, int] | None = None


class SequencePacker:
    """Greedy in-order packing: a document goes into the current sequence if it fits, else the sequence is
    padded and emitted. Images are never split; long captions are truncated to fit one sequence."""

    def __init__(
        self,
        max_len: int,
        tokens_per_image: int,
        boi_id: int,
        eoi_id: int,
        prefix_ids: list[int],
        eos_id: int | None,
        pad_id: int,
    ) -> None:
        self.max_len, self.tokens_per_image = max_len, tokens_per_image
        self.boi_id, self.eoi_id, self.prefix_ids, self.eos_id, self.pad_id = boi_id, eoi_id, prefix_ids, eos_id, pad_id
        self._fixed = tokens_per_image + 2 + len(prefix_ids) + (eos_id is not None)
        if self._fixed > max_len:
            raise ValueError(
                f"max_len={max_len} cannot hold one image ({tokens_per_image} tokens + BOI/EOI/prefix/EOS)"
            )
        self.pending: list[Document] = []

    def document(self, key: str, caption_ids: list[int], latent: torch.Tensor, image_first: bool) -> Document:
        caption_ids = caption_ids[: self.max_len - self._fixed]
        image = [self.boi_id] + [self.pad_id] * self.tokens_per_image + [self.eoi_id]
        image_mod = [TEXT] + [IMAGE] * self.tokens_per_image + [TEXT]
        parts = [(image, image_mod), (caption_ids, [TEXT] * len(caption_ids))]
        if not image_first:
            parts.reverse()
        ids = list(self.prefix_ids)
        mod = [TEXT] * len(ids)
        for p_ids, p_mod in parts:
            ids += p_ids
            mod += p_mod
        if self.eos_id is not None:
            ids.append(self.eos_id)
            mod.append(TEXT)
        return Document(key, ids, mod, latent, image_first)

    def add(self, doc: Document) -> PackedSequence | None:
        """Adds a document; returns the sequence it closed, if any."""
        done = None
        if self.pending and sum(map(len, self.pending)) + len(doc) > self.max_len:
            done = self.flush()
        self.pending.append(doc)
        return done

    def flush(self) -> PackedSequence | None:
        if not self.pending:
            return None
        docs, self.pending = self.pending, []
        ids, mod, doc_ids, labels = [], [], [], []
        for i, d in enumerate(docs):
            ids += d.input_ids
            mod += d.modality
            doc_ids += [i] * len(d)
            labels += [t if m == TEXT else IGNORE_INDEX for t, m in zip(d.input_ids, d.modality, strict=True)]
        pad = self.max_len - len(ids)
        ids += [self.pad_id] * pad
        mod += [TEXT] * pad
        doc_ids += [len(docs)] * pad
        labels += [IGNORE_INDEX] * pad
        return PackedSequence(
            torch.tensor(ids), torch.tensor(mod), torch.tensor(doc_ids), torch.tensor(labels),
            [d.latent for d in docs], [d.image_first for d in docs], [d.key for d in docs],
        )

    def state_dict(self) -> dict:
        return {"pending": [vars(d).copy() for d in self.pending]}

    def load_state_dict(self, state: dict) -> None:
        self.pending = [Document(**d) for d in state["pending"]]


def collate_packed(seqs: list[PackedSequence]) -> dict:
    """Stacks sequences; images are concatenated in row-major order, the order the model numbers them in."""
    latents = [lat for s in seqs for lat in s.latents]
    return {
        "input_ids": torch.stack([s.input_ids for s in seqs]),
        "modality": torch.stack([s.modality for s in seqs]),
        "doc_ids": torch.stack([s.doc_ids for s in seqs]),
        "labels": torch.stack([s.labels for s in seqs]),
        "latents": torch.stack(latents) if latents else None,
        "image_first": torch.tensor([f for s in seqs for f in s.image_first], dtype=torch.bool),
        "keys": [k for s in seqs for k in s.keys],
        "reader_health": [s.reader_health for s in seqs if s.reader_health is not None],
    }
