"""Modality routing by index: each token's rows go through its own modality's weights only.

Tokens are kept in grouped order [text rows | image rows] between attentions, so a routed op is two dense
matmuls on contiguous slices (no compute-both-and-select, no per-op gather); only attention needs the
sequence order, reached with one index_select each way per layer."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from megafusion.model.layout import IMAGE


class ModalityRouter:
    def __init__(self, modality: torch.Tensor) -> None:
        self.batch, self.seq = modality.shape
        flat = modality.reshape(-1)
        is_image = flat == IMAGE
        self.num_image = int(is_image.sum())
        self.num_text = flat.numel() - self.num_image
        if self.num_image == 0 or self.num_text == 0:
            self._order = None
            self._inverse = None
        else:
            # Stable sort keeps each modality's rows in sequence order (image tokens stay image-contiguous).
            self._order = torch.argsort(is_image.to(torch.int8), stable=True)
            self._inverse = torch.empty_like(self._order)
            self._inverse[self._order] = torch.arange(flat.numel(), device=flat.device)

    @property
    def text_index(self) -> torch.Tensor | None:
        """Flat (B*S) indices of the text rows in grouped order; None means 'all rows, in order'."""
        if self._order is None:
            return None
        return self._order[: self.num_text]

    def to_grouped(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(self.batch * self.seq, *x.shape[2:])
        return flat if self._order is None else flat.index_select(0, self._order)

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if self._inverse is None else x.index_select(0, self._inverse)
        return flat.reshape(self.batch, self.seq, *x.shape[1:])

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[: self.num_text], x[self.num_text :]


class Routed(nn.Module):
    """A module with one parameter set per modality (`text`, `image`) or a single `shared` set."""

    def __init__(self, factory: Callable[[], nn.Module], separate: bool) -> None:
        super().__init__()
        self.separate = separate
        if separate:
            self.text = factory()
            self.image = factory()
        else:
            self.shared = factory()

    def forward(self, x: torch.Tensor, router: ModalityRouter) -> torch.Tensor:
        if not self.separate:
            return self.shared(x)
        if router.num_image == 0:
            return self.text(x)
        if router.num_text == 0:
            return self.image(x)
        text_rows, image_rows = router.split(x)
        return torch.cat((self.text(text_rows), self.image(image_rows)), dim=0)

    def text_module(self) -> nn.Module:
        return self.text if self.separate else self.shared
