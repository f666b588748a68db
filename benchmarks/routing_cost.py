"""Cost of modality routing by index against computing both parameter sets for every token and selecting.

Runs forward+backward of a stack of deep-separation LlamaFusion layers on a 50/50 text/image sequence, both
ways, with the same weights, interleaving the two so machine noise hits both alike, and prints the ratio.

    python benchmarks/routing_cost.py [--hidden 576 --layers 4 --seq 1024 --batch 2 --repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from megafusion.model.arch import LlamaArch
from megafusion.model.attention import sdpa_attention
from megafusion.model.block import FusionBlock
from megafusion.model.hybrid_mask import HybridMask
from megafusion.model.layout import IMAGE, TokenLayout
from megafusion.model.rope import RotaryEmbedding
from megafusion.model.routing import ModalityRouter, Routed


class ComputeBothRouted(nn.Module):
    """The rejected baseline: both sets run on every token, then a per-token select."""

    def __init__(self, routed: Routed, is_image: torch.Tensor) -> None:
        super().__init__()
        self.routed, self.is_image = routed, is_image

    def forward(self, x: torch.Tensor, router: ModalityRouter) -> torch.Tensor:
        both_text, both_image = self.routed.text(x), self.routed.image(x)
        return torch.where(self.is_image[:, None], both_image, both_text)


class IdentityRouter(ModalityRouter):
    """Keeps sequence order (what compute-both needs) while reporting the true modality counts."""

    def __init__(self, modality: torch.Tensor) -> None:
        super().__init__(modality)
        self._order = self._inverse = None


def build(args: argparse.Namespace):
    arch = LlamaArch(
        vocab_size=128, hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads,
    )
    torch.manual_seed(0)
    layers = nn.ModuleList(FusionBlock(arch, "deep") for _ in range(args.layers))
    # Text/image alternate in 256-token blocks: caption, image, caption, image, ... (50/50).
    seq, block = args.seq, 256
    pattern = (torch.arange(seq) // block) % 2
    modality = pattern.expand(args.batch, seq).clone()
    layout = TokenLayout.build(torch.zeros_like(modality), modality, tokens_per_image=block)
    return arch, layers, layout


def run(layers, routers, layout, arch, x_seq, compute_both: bool) -> float:
    router = routers[compute_both]
    mask = HybridMask(layout)
    rope = RotaryEmbedding(arch)(layout.position_ids, x_seq.dtype)
    h = router.to_grouped(x_seq).detach().requires_grad_(True)
    start = time.perf_counter()
    for layer in layers:
        h = layer(h, router, rope, mask, sdpa_attention)
    h.square().mean().backward()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    arch, layers, layout = build(args)
    is_image = (layout.modality == IMAGE).reshape(-1)
    index_router = ModalityRouter(layout.modality)
    routers = {False: index_router, True: IdentityRouter(layout.modality)}
    both_layers = nn.ModuleList()
    for layer in layers:
        twin = FusionBlock.__new__(FusionBlock)
        nn.Module.__init__(twin)
        twin.num_heads, twin.num_kv_heads, twin.head_dim = layer.num_heads, layer.num_kv_heads, layer.head_dim
        for name in ("attn_in", "attn_out", "ffn"):
            setattr(twin, name, ComputeBothRouted(getattr(layer, name), is_image))
        both_layers.append(twin)

    x_seq = torch.randn(args.batch, args.seq, args.hidden)
    # Same weights, same input: the two paths must agree before their times mean anything.
    with torch.no_grad():
        a = index_router.to_sequence(_forward(layers, index_router, layout, arch, x_seq))
        b = _forward(both_layers, routers[True], layout, arch, x_seq).reshape(a.shape)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

    times = {False: [], True: []}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for compute_both in (False, True):
            net = both_layers if compute_both else layers
            net.zero_grad(set_to_none=True)
            times[compute_both].append(run(net, routers, layout, arch, x_seq, compute_both))
    index_t, both_t = sorted(times[False][1:])[args.repeats // 2], sorted(times[True][1:])[args.repeats // 2]
    tokens = args.batch * args.seq
    print(f"layers={args.layers} hidden={args.hidden} ffn={args.intermediate} tokens={tokens} (50% image), "
          f"fwd+bwd, median of {args.repeats}, threads={torch.get_num_threads()}")
    print(f"index routing        : {index_t * 1e3:8.1f} ms")
    print(f"compute-both + select: {both_t * 1e3:8.1f} ms")
    print(f"ratio (compute-both / index routing): {both_t / index_t:.2f}x")


def _forward(layers, router, layout, arch, x_seq):
    mask = HybridMask(layout)
    rope = RotaryEmbedding(arch)(layout.position_ids, x_seq.dtype)
    h = router.to_grouped(x_seq)
    for layer in layers:
        h = layer(h, router, rope, mask, sdpa_attention)
    return h


if __name__ == "__main__":
    main()
