"""The Triton modality-routed grouped GEMM (forward, grad input, grad weight per segment) against per-modality
F.linear, on CPU through Triton's interpreter (fp32)."""

import os

# Must be set before triton is imported (kernels are created as interpreted functions at import).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install triton); the Triton kernels are optional")

from megafusion.kernels import grouped_linear, reference_grouped_linear  # noqa: E402
from megafusion.kernels.grouped_gemm import grouped_matmul  # noqa: E402
from tests.kernels.layouts import rel_err  # noqa: E402


def _inputs(rows: int, d_in: int, d_out: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d_in, generator=g).requires_grad_(True)
    w_text = torch.randn(d_out, d_in, generator=g).requires_grad_(True)
    w_image = torch.randn(d_out, d_in, generator=g).requires_grad_(True)
    return x, w_text, w_image


@pytest.mark.parametrize(
    "rows, split, d_in, d_out",
    [
        (77, 29, 48, 40),  # segments and widths not multiples of any tile
        (64, 64, 32, 24),  # text only
        (50, 0, 32, 24),  # image only
        (130, 3, 72, 96),  # several row tiles, a tiny text segment
        (9, 5, 16, 160),  # wider output than input (Q/K/V, gate/up)
    ],
)
def test_forward_and_backward_match_per_modality_linear(rows, split, d_in, d_out):
    x, w_text, w_image = _inputs(rows, d_in, d_out)
    y = grouped_linear(x, split, w_text, w_image)
    ref = reference_grouped_linear(x, split, w_text, w_image)
    assert rel_err(y, ref) < 1e-4
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, w_text, w_image), grad)
    want = torch.autograd.grad(ref, (x, w_text, w_image), grad)
    for name, a, b in zip(("x", "w_text", "w_image"), got, want, strict=True):
        if float(b.abs().max()) == 0:  # an empty segment's weight gets an exact zero gradient
            assert float(a.abs().max()) == 0, name
        else:
            assert rel_err(a, b) < 1e-4, f"d{name}: relative error {rel_err(a, b):.2e}"


def test_frozen_text_weight_gets_no_gradient_and_image_weight_does():
    x, w_text, w_image = _inputs(40, 32, 24, seed=1)
    w_text.requires_grad_(False)
    y = grouped_linear(x, 17, w_text, w_image)
    y.square().sum().backward()
    assert w_text.grad is None
    ref_x = x.detach().clone().requires_grad_(True)
    ref_w = w_image.detach().clone().requires_grad_(True)
    reference_grouped_linear(ref_x, 17, w_text, ref_w).square().sum().backward()
    assert rel_err(w_image.grad, ref_w.grad) < 1e-4
    assert rel_err(x.grad, ref_x.grad) < 1e-4


def test_one_launch_serves_both_segments(monkeypatch):
    """Forward is a single kernel launch whatever the split (the point of the grouped GEMM)."""
    from megafusion.kernels import grouped_gemm

    launches = []
    kernel = grouped_gemm._grouped_matmul_kernel
    monkeypatch.setattr(grouped_gemm, "_grouped_matmul_kernel", _Counting(kernel, launches))
    x, w_text, w_image = _inputs(45, 16, 16, seed=2)
    grouped_matmul(x.detach(), w_text.detach().t(), w_image.detach().t(), 20)
    assert len(launches) == 1


class _Counting:
    def __init__(self, kernel, launches: list) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]


def test_rejects_mismatched_weights():
    x, w_text, _ = _inputs(10, 16, 8)
    with pytest.raises(ValueError, match="do not fit"):
        grouped_linear(x, 4, w_text, torch.randn(8, 12))
