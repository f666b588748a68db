"""One LlamaFusion layer: routed Q/K/V, shared hybrid-masked attention, routed O, routed FFN."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from megafusion.model.arch import LlamaArch
from megafusion.model.hybrid_mask import HybridMask
from megafusion.model.layers import AttentionInput, FeedForward
from megafusion.model.rope import apply_rotary
from megafusion.model.routing import ModalityRouter, Routed

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, HybridMask], torch.Tensor]

# Which sub-blocks get a separate image parameter set, per ablation arm of the paper (section 5).
SEPARATED_PARTS = {
    "deep": {"attention": True, "ffn": True},
    "ffn": {"attention": False, "ffn": True},
    "none": {"attention": False, "ffn": False},
}


class FusionBlock(nn.Module):
    def __init__(self, arch: LlamaArch, separation: str) -> None:
        super().__init__()
        parts = SEPARATED_PARTS[separation]
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.attn_in = Routed(lambda: AttentionInput(arch), parts["attention"])
        self.attn_out = Routed(
            lambda: nn.Linear(arch.num_heads * arch.head_dim, arch.hidden_size, bias=False), parts["attention"]
        )
        self.ffn = Routed(lambda: FeedForward(arch), parts["ffn"])

    def forward(
        self,
        h: torch.Tensor,
        router: ModalityRouter,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: HybridMask,
        attention: AttentionFn,
        past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """h: (tokens, hidden) in the router's grouped order; returns the same layout.

        With `past_kv` (post-RoPE keys and values of earlier tokens, each (B, H_kv, P, D)) the new tokens also
        attend to them and `mask` covers [past + new] keys. With `return_kv` returns (h, (keys, values)) of
        past + new, the next cache entry of this layer. (One entry point, so module hooks, e.g. FSDP's, run.)"""
        qkv = router.to_sequence(self.attn_in(h, router))
        b, s = router.batch, router.seq
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split((q_dim, kv_dim, kv_dim), dim=-1)
        q = q.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_kv is not None:
            k, v = torch.cat((past_kv[0], k), dim=2), torch.cat((past_kv[1], v), dim=2)
        o = attention(q, k, v, mask).transpose(1, 2).reshape(b, s, q_dim)
        h = h + self.attn_out(router.to_grouped(o), router)
        h = h + self.ffn(h, router)
        return (h, (k, v)) if return_kv else h
