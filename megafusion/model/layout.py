"""Per-token layout of a (possibly packed, possibly multimodal) batch: modality, image id, document id, position."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TEXT = 0
IMAGE = 1


def image_ids_from_runs(modality: torch.Tensor) -> torch.Tensor:
    """Number each maximal run of image tokens 0, 1, ... in row-major order; text tokens get -1."""
    is_image = modality == IMAGE
    prev = torch.zeros_like(is_image)
    prev[:, 1:] = is_image[:, :-1]
    starts = (is_image & ~prev).reshape(-1)
    run_id = torch.cumsum(starts.long(), 0) - 1
    return torch.where(is_image.reshape(-1), run_id, torch.full_like(run_id, -1)).reshape(modality.shape)


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
    ) -> TokenLayout:
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
            image_ids = image_ids_from_runs(modality)
        elif bool(((image_ids >= 0) != (modality == IMAGE)).any()):
            raise ValueError("image_ids must be >= 0 exactly at image tokens and -1 at text tokens")
        if doc_ids is None:
            doc_ids = torch.zeros(shape, dtype=torch.long, device=device)
        if position_ids is None:
            position_ids = positions_from_documents(doc_ids)
        return cls(modality, image_ids.long(), doc_ids.long(), position_ids.long())
