"""Per-token layout of a (possibly packed, possibly multimodal) batch: modality, image id, document id, position."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT = 0
IMAGE = 1


def image_ids_in_order(modality: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """Number images 0, 1, ... in row-major order, each `tokens_per_image` consecutive image tokens; text gets -1.
    Counting tokens rather than runs keeps two adjacent images (no BOI/EOI between them) apart."""
    is_image = (modality == IMAGE).reshape(-1)
    ids = torch.div(torch.cumsum(is_image.long(), 0) - 1, tokens_per_image, rounding_mode="floor")
    return torch.where(is_image, ids, torch.full_like(ids, -1)).reshape(modality.shape)


def check_images_contiguous(image_ids: torch.Tensor, tokens_per_image: int) -> None:
    """Each image must own exactly `tokens_per_image` adjacent positions of one row, numbered in order."""
    flat = image_ids.reshape(-1)
    where = torch.nonzero(flat >= 0).squeeze(1)
    if where.numel() == 0:
        return
    ids = flat[where]
    expected = torch.div(torch.arange(ids.numel(), device=ids.device), tokens_per_image, rounding_mode="floor")
    if ids.numel() % tokens_per_image or not torch.equal(ids, expected):
        raise ValueError(
            f"image tokens must come in runs of image.tokens_per_image={tokens_per_image} with image ids "
            f"0, 1, ... in order; got {ids.numel()} image tokens with ids {torch.unique(ids).tolist()[:8]}"
        )
    seq = image_ids.shape[1]
    same_image = ids[1:] == ids[:-1]
    adjacent = (where[1:] == where[:-1] + 1) & (where[1:] // seq == where[:-1] // seq)
    if not bool(adjacent[same_image].all()):
        raise ValueError("an image's tokens must be adjacent positions in one row")


def positions_from_documents(doc_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 at the first token of every packed document."""
    seq = doc_ids.shape[1]
    idx = torch.arange(seq, device=doc_ids.device).expand_as(doc_ids)
    new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.cummax(torch.where(new_doc, idx, torch.zeros_like(idx)), dim=1).values
    return idx - start


@dataclass
class TokenLayout:
    """modality: 0 text / 1 image; image_ids: -1 for text, else a batch-global image index whose tokens are
    contiguous and numbered in row-major order; doc_ids: packed document of each token; position_ids: RoPE."""

    modality: torch.Tensor
    image_ids: torch.Tensor
    doc_ids: torch.Tensor
    position_ids: torch.Tensor

    @property
    def num_images(self) -> int:
        return int(self.image_ids.max().item()) + 1 if self.image_ids.numel() else 0

    @property
    def has_images(self) -> bool:
        return bool((self.modality == IMAGE).any())

    @classmethod
    def build(
        cls,
        input_ids: torch.Tensor,
        modality: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        tokens_per_image: int | None = None,
    ) -> TokenLayout:
        """Fills the defaults: all text, images numbered in order (needs tokens_per_image), one document,
        positions restarting per document. With tokens_per_image, checks every image is one contiguous run."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        shape, device = input_ids.shape, input_ids.device
        if modality is None:
            modality = torch.full(shape, TEXT, dtype=torch.long, device=device)
        for name, t in (("modality", modality), ("image_ids", image_ids), ("doc_ids", doc_ids),
                        ("position_ids", position_ids)):
            if t is not None and t.shape != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like input_ids")
        modality = modality.long()
        if bool(((modality != TEXT) & (modality != IMAGE)).any()):
            raise ValueError(f"modality must hold only {TEXT} (text) and {IMAGE} (image)")
        if image_ids is None:
            if tokens_per_image is None and bool((modality == IMAGE).any()):
                raise ValueError("image_ids or tokens_per_image is needed to tell images apart")
            image_ids = image_ids_in_order(modality, tokens_per_image or 1)
        elif bool(((image_ids >= 0) != (modality == IMAGE)).any()):
            raise ValueError("image_ids must be >= 0 exactly at image tokens and -1 at text tokens")
        if tokens_per_image is not None:
            check_images_contiguous(image_ids, tokens_per_image)
        if doc_ids is None:
            doc_ids = torch.zeros(shape, dtype=torch.long, device=device)
        if position_ids is None:
            position_ids = positions_from_documents(doc_ids)
        return cls(modality, image_ids.long(), doc_ids.long(), position_ids.long())
