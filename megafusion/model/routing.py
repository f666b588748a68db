"""Modality routing by index: each token's rows go through its own modality's weights only.

Tokens are kept in grouped order [text rows | image rows] between attentions, so a routed op is two dense
matmuls on contiguous slices (no compute-both-and-select, no per-op gather); only attention needs the
sequence order, reached with one index_select each way per layer.

Routing backends (ModelConfig.routing):
* `index`  (default, the reference): each parameter set's modules run on their own contiguous slice;
* `triton` : the grouped GEMM of kernels/grouped_gemm.py runs both slices through their weights in ONE launch per
             projection (Q/K/V fused into one, gate/up fused into one, then O and down); norms and the SwiGLU
             activation stay in torch. CUDA only (or CPU under TRITON_INTERPRET=1, for tests). The fused path
             reads the text/image modules' weights directly rather than calling the Linear submodules, so sharding
             that gathers parameters in per-submodule hooks (DeepSpeed ZeRO-3) needs `index`;
* `auto`   : `triton` when the tokens are on CUDA and triton imports, else `index`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megafusion.model.layers import AttentionInput, FeedForward
from megafusion.model.layout import IMAGE

ROUTING_BACKENDS: tuple[str, ...] = ("index", "triton", "auto")


def resolve_routing(routing: str, device: torch.device) -> str:
    """The concrete backend ('index' or 'triton') for tokens on `device`."""
    if routing not in ROUTING_BACKENDS:
        raise ValueError(f"routing must be one of {ROUTING_BACKENDS}, got {routing!r}")
    if routing == "auto":
        from megafusion.kernels import triton_available

        return "triton" if device.type == "cuda" and triton_available() else "index"
    return routing


class ModalityRouter:
    def __init__(self, modality: torch.Tensor, routing: str = "index", valid: torch.Tensor | None = None) -> None:
        """valid: (B, S) bool, False on padding positions that no weight set should process (the frozen-row split
        pads its packed rows): they are left out of the grouped rows, and read as zeros in sequence order."""
        self.batch, self.seq = modality.shape
        self.routing = resolve_routing(routing, modality.device)
        flat = modality.reshape(-1)
        is_image = flat == IMAGE
        self.num_image = int(is_image.sum())
        self._padded = valid is not None and not bool(valid.all())
        if self._padded:
            # Sort key 0 text, 1 image, 2 padding (cut off), stable so each group keeps sequence order.
            key = torch.where(valid.reshape(-1), is_image.to(torch.int8), torch.full_like(flat, 2, dtype=torch.int8))
            self.num_image = int((is_image & valid.reshape(-1)).sum())
            num_rows = int(valid.sum())
            order = torch.argsort(key, stable=True)
            self._order = order[:num_rows]
            # Positions of padding point one past the grouped rows, at the zero row to_sequence appends.
            self._inverse = torch.full_like(order, num_rows)
            self._inverse[self._order] = torch.arange(num_rows, device=flat.device)
        elif self.num_image == 0 or self.num_image == flat.numel():
            self._order = None
            self._inverse = None
        else:
            # Stable sort keeps each modality's rows in sequence order (image tokens stay image-contiguous).
            self._order = torch.argsort(is_image.to(torch.int8), stable=True)
            self._inverse = torch.empty_like(self._order)
            self._inverse[self._order] = torch.arange(flat.numel(), device=flat.device)
        num_rows = flat.numel() if self._order is None else self._order.numel()
        self.num_text = num_rows - self.num_image

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
        if self._padded:
            x = torch.cat((x, x.new_zeros(1, *x.shape[1:])), dim=0)
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
        if router.routing == "triton":
            fused = grouped_forward(self.text, self.image, x, router.num_text)
            if fused is not None:
                return fused
        text_rows, image_rows = router.split(x)
        return torch.cat((self.text(text_rows), self.image(image_rows)), dim=0)

    def text_module(self) -> nn.Module:
        return self.text if self.separate else self.shared


def _no_bias(*linears: nn.Linear) -> bool:
    return all(m.bias is None for m in linears)


def grouped_forward(text: nn.Module, image: nn.Module, x: torch.Tensor, num_text: int) -> torch.Tensor | None:
    """The `triton` routing of one Routed pair over grouped rows x = [text rows | image rows]: every projection
    is one grouped-GEMM launch over both segments. None for a module type it does not know (index routing
    then runs it, so a new module kind is never silently wrong)."""
    from megafusion.kernels import grouped_linear

    def norms(norm_text: nn.Module, norm_image: nn.Module) -> torch.Tensor:
        return torch.cat((norm_text(x[:num_text]), norm_image(x[num_text:])), dim=0)

    if isinstance(text, nn.Linear) and isinstance(image, nn.Linear) and _no_bias(text, image):
        return grouped_linear(x, num_text, text.weight, image.weight)
    if isinstance(text, AttentionInput) and isinstance(image, AttentionInput):
        projections = [(m.q_proj, m.k_proj, m.v_proj) for m in (text, image)]
        if not all(_no_bias(*p) for p in projections):
            return None
        # Q, K and V share their input: one GEMM against the stacked [Wq; Wk; Wv] gives AttentionInput's output.
        w_text, w_image = (torch.cat([p.weight for p in group], dim=0) for group in projections)
        return grouped_linear(norms(text.norm, image.norm), num_text, w_text, w_image)
    if isinstance(text, FeedForward) and isinstance(image, FeedForward):
        if not all(_no_bias(m.gate_proj, m.up_proj, m.down_proj) for m in (text, image)):
            return None
        w_text, w_image = (torch.cat((m.gate_proj.weight, m.up_proj.weight), dim=0) for m in (text, image))
        gate, up = grouped_linear(norms(text.norm, image.norm), num_text, w_text, w_image).chunk(2, dim=-1)
        return grouped_linear(F.silu(gate) * up, num_text, text.down_proj.weight, image.down_proj.weight)
    return None
