"""LlamaFusion: a frozen pretrained Llama (text set) beside a trainable image set, one shared attention."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers.utils import ModelOutput

from megafusion.model.arch import LlamaArch
from megafusion.model.args import SEPARATIONS, DiffusionArgs, ImageConfig, UNetConfig
from megafusion.model.attention import ATTENTION_BACKENDS
from megafusion.model.block import FusionBlock
from megafusion.model.frozen_rows import FrozenSplit
from megafusion.model.kv_cache import KVCache, cached_doc_ids, chunk_mask, extend_cache
from megafusion.model.layers import RMSNorm
from megafusion.model.layout import TokenLayout
from megafusion.model.rope import RotaryEmbedding
from megafusion.model.routing import ROUTING_BACKENDS, ModalityRouter, Routed
from megafusion.model.unet import UNetDown, UNetUp

NUM_SPECIAL_TOKENS = 2  # BOI, EOI
# Top-level parameters that belong to the image learning-rate group besides every routed `.image.` set.
IMAGE_GROUP_PREFIXES = ("unet_down.", "unet_up.", "special_embed", "special_head")


@dataclass
class FusionOutput(ModelOutput):
    """A dict as well as a dataclass (transformers' ModelOutput), so hooks that walk outputs (DeepSpeed ZeRO-3)
    find the tensors inside."""

    # (B, S, V) over the base vocabulary; rows of image tokens are zero (the LM head is text-only).
    logits: torch.Tensor | None = None
    # (B, S, 2) logits of the new BOI / EOI tokens, kept apart so `logits` is exactly the base LM's.
    special_logits: torch.Tensor | None = None
    # (N_images, C, H, W) predicted noise, or None when the batch holds no image.
    noise_pred: torch.Tensor | None = None
    # (N_text, hidden) final-normed hidden states of text tokens and their flat (B*S) indices.
    text_hidden: torch.Tensor | None = None
    text_index: torch.Tensor | None = None
    # With use_cache: the cache of [past + these tokens]; the cache passed in is left unchanged. Not named
    # `past_key_values`: transformers 5.2x's ModelOutput silently redirects that name to a `cache` field.
    kv_cache: KVCache | None = None
    # With lm_targets: logits over base vocabulary + BOI/EOI for exactly the text rows that have a target.
    lm_logits: torch.Tensor | None = None
    lm_targets: torch.Tensor | None = None
    # With frozen_split, for the text rows that ran without autograd and have a target: (N, 4) columns
    # [log-sum-exp over the base vocabulary, base logit of the target (0 for BOI/EOI targets), BOI logit, EOI logit]
    # (only the last two can carry a gradient), their targets, and the (B, S) mask of those frozen rows.
    frozen_lm_logits: torch.Tensor | None = None
    frozen_lm_targets: torch.Tensor | None = None
    frozen_rows: torch.Tensor | None = None


@dataclass(frozen=True)
class _Trunk:
    router: ModalityRouter
    text_h: torch.Tensor  # final-normed text rows, grouped order
    noise_pred: torch.Tensor | None
    cache: KVCache | None


class LlamaFusion(nn.Module):
    def __init__(
        self,
        arch: LlamaArch,
        separation: str = "deep",
        image: ImageConfig | None = None,
        unet: UNetConfig | None = None,
        attention: str = "sdpa",
        routing: str = "index",
    ) -> None:
        """attention: sdpa | flex | triton | auto (model/attention.py); routing: index | triton | auto
        (model/routing.py). Backends change how the same function is computed, never the weights."""
        super().__init__()
        if separation not in SEPARATIONS:
            raise ValueError(f"separation must be one of {SEPARATIONS}, got {separation!r}")
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {sorted(ATTENTION_BACKENDS)}, got {attention!r}")
        if routing not in ROUTING_BACKENDS:
            raise ValueError(f"routing must be one of {ROUTING_BACKENDS}, got {routing!r}")
        self.arch, self.separation = arch, separation
        self.image_config, self.unet_config = image or ImageConfig(), unet or UNetConfig()
        self.attention_backend = attention
        self.routing_backend = routing
        d = arch.hidden_size
        self.boi_id, self.eoi_id = arch.vocab_size, arch.vocab_size + 1

        self.embed_tokens = nn.Embedding(arch.vocab_size, d)
        self.special_embed = nn.Parameter(torch.zeros(NUM_SPECIAL_TOKENS, d))
        self.layers = nn.ModuleList(FusionBlock(arch, separation) for _ in range(arch.num_layers))
        self.norm = RMSNorm(d, arch.rms_norm_eps)
        self.lm_head = None if arch.tie_word_embeddings else nn.Linear(d, arch.vocab_size, bias=False)
        self.special_head = nn.Parameter(torch.zeros(NUM_SPECIAL_TOKENS, d))
        self.rotary = RotaryEmbedding(arch)
        self.unet_down = UNetDown(self.image_config, self.unet_config, d)
        self.unet_up = UNetUp(self.image_config, self.unet_config, d, arch.rms_norm_eps)
        self.base_path: str | None = None
        # What the model was trained with, saved beside its weights so sampling and evaluation use the same:
        # the noise process, and the token ids every training document started with (the tokenizer's prefix).
        self.diffusion_args = DiffusionArgs()
        self.document_prefix: list[int] | None = None

    # ------------------------------------------------------------------ parameters
    @staticmethod
    def parameter_group(name: str) -> str:
        """'image' for the image set, U-Nets and BOI/EOI; 'text' for the pretrained (or shared) weights."""
        if ".image." in name or name.startswith(IMAGE_GROUP_PREFIXES):
            return "image"
        return "text"

    def grouped_parameters(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"text": [], "image": []}
        for name, p in self.named_parameters():
            groups[self.parameter_group(name)].append((name, p))
        return groups

    def init_image_set_from_text(self) -> None:
        """Paper: the image attention/FFN/norm set starts as a copy of the pretrained text set."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, Routed) and module.separate:
                    module.image.load_state_dict(module.text.state_dict())
            self.unet_up.norm.weight.copy_(self.norm.weight)
            # New tokens start at the mean embedding / head row: in-distribution, and no existing row moves.
            self.special_embed.copy_(self.embed_tokens.weight.mean(0, keepdim=True).expand_as(self.special_embed))
            self.special_head.copy_(self.lm_head_weight.mean(0, keepdim=True).expand_as(self.special_head))

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # ------------------------------------------------------------------ forward
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of text-modality ids, where ids >= vocab_size are BOI/EOI."""
        vocab = self.arch.vocab_size
        special = ids >= vocab
        h = self.embed_tokens(ids.clamp(max=vocab - 1))
        if bool(special.any()):
            extra = self.special_embed[(ids - vocab).clamp(min=0, max=NUM_SPECIAL_TOKENS - 1)]
            h = torch.where(special[..., None], extra.to(h.dtype), h)
        return h

    def lm_logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits over the base vocabulary, logits of BOI/EOI) for final-normed text hidden states."""
        # The untied head is called as a module so parameter-gathering hooks (ZeRO-3) see it.
        logits = self.lm_head(hidden) if self.lm_head is not None else nn.functional.linear(hidden, self.lm_head_weight)
        return logits, nn.functional.linear(hidden, self.special_head)

    def forward(
        self,
        input_ids: torch.Tensor,
        modality: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        compute_logits: bool = True,
        kv_cache: KVCache | None = None,
        use_cache: bool = False,
        lm_targets: torch.Tensor | None = None,
        frozen_split: bool = False,
        frozen_lm: bool = True,
    ) -> FusionOutput:
        """input_ids: (B, S), ignored at image positions. images: (N, C, H, W) noisy latents, one per
        image id in order, with their diffusion `timesteps` (N,).

        KV cache: with `kv_cache` the S tokens are a continuation of the cached ones: they attend to
        [cached + new] under the hybrid rule, and every image must lie wholly inside this chunk (image ids are
        chunk-local, like `images`). Defaults then continue the cache: doc_ids = the last cached token's,
        position_ids = its position + 1, 2, ... With `use_cache` the output carries the cache of past + new.

        Training: `lm_targets` (B, S) next-token targets (-100 = none) make the LM head run only on the text rows
        that have one, inside this forward (where sharded parameters are gathered).

        `frozen_split` (training, with lm_targets and compute_logits=False, grad enabled, every text-group
        parameter frozen): the rows no trainable parameter reaches (model/frozen_rows.py) run first without
        autograd and the others attend to their cached keys/values; gradients are those of the full computation.
        `lm_logits` then covers the other rows, `frozen_lm_logits` the frozen ones (always when the trainable BOI/EOI
        head reaches their loss, else only with `frozen_lm`, as a loss to log), and `text_hidden` is None."""
        layout = TokenLayout.build(
            input_ids, modality, image_ids, cached_doc_ids(input_ids, doc_ids, kv_cache, len(self.layers)),
            position_ids, self.image_config.tokens_per_image,
        )
        if kv_cache is not None and position_ids is None:
            layout = replace(layout, position_ids=kv_cache.continuation_positions(layout.doc_ids))
        if frozen_split and lm_targets is not None and kv_cache is None and not use_cache and not compute_logits:
            split = self.frozen_split(input_ids, layout)
            if split is not None:
                return self._forward_split(input_ids, layout, split, images, timesteps, lm_targets, frozen_lm)

        trunk = self._trunk(input_ids, layout, images, timesteps, kv_cache, use_cache)
        text_h, router = trunk.text_h, trunk.router
        text_index = router.text_index
        if text_index is None:
            text_index = torch.arange(router.num_text, device=input_ids.device)
        logits = special_logits = None
        if compute_logits:
            logits, special_logits = self._scatter_logits(*self.lm_logits(text_h), router, text_index)
        lm_logits = targets = None
        if lm_targets is not None:
            lm_logits, targets = self._target_logits(text_h, lm_targets.reshape(-1)[text_index])
        return FusionOutput(logits, special_logits, trunk.noise_pred, text_h, text_index, trunk.cache, lm_logits,
                            targets)

    def frozen_split(self, input_ids: torch.Tensor, layout: TokenLayout) -> FrozenSplit | None:
        """The rows forward(frozen_split=True) would run without autograd on this batch, or None when it would run
        the full computation (autograd off, a trainable text-group parameter, or nothing to split)."""
        if not torch.is_grad_enabled() or not self.text_path_frozen():
            return None
        return FrozenSplit.of(input_ids, layout, self.arch.vocab_size)

    def text_path_frozen(self) -> bool:
        """Whether every text-group parameter (embeddings, text or shared sets, final norm, LM head: everything a
        base-vocabulary token's hidden states pass through) is frozen, read from requires_grad."""
        return not any(p.requires_grad for name, p in self.named_parameters() if self.parameter_group(name) == "text")

    def _trunk(
        self,
        input_ids: torch.Tensor,
        layout: TokenLayout,
        images: torch.Tensor | None,
        timesteps: torch.Tensor | None,
        kv_cache: KVCache | None,
        use_cache: bool,
        valid: torch.Tensor | None = None,
    ) -> _Trunk:
        """Embeddings (and U-Net down), the layers, the final norm (and U-Net up) of one chunk; `valid`: see
        ModalityRouter."""
        router = ModalityRouter(layout.modality, self.routing_backend, valid)
        mask, cache_image_ids = chunk_mask(layout, kv_cache)
        dtype = self.embed_tokens.weight.dtype

        text_ids = router.to_grouped(input_ids)[: router.num_text]
        h = self.embed(text_ids)
        skip = None
        num_images = 0
        if router.num_image:
            num_images = layout.num_images
            images, timesteps = self._check_images(images, timesteps, num_images)
            image_tokens, skip = self.unet_down(images.to(dtype), timesteps)
            h = torch.cat((h, image_tokens.reshape(-1, image_tokens.shape[-1])), dim=0)

        rope = self.rotary(layout.position_ids, dtype)
        attention = ATTENTION_BACKENDS[self.attention_backend]
        new_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, layer in enumerate(self.layers):
            if kv_cache is None and not use_cache:
                h = layer(h, router, rope, mask, attention)
                continue
            past = None if kv_cache is None else (kv_cache.keys[i], kv_cache.values[i])
            if not use_cache:
                h = layer(h, router, rope, mask, attention, past_kv=past)
                continue
            h, kv = layer(h, router, rope, mask, attention, past_kv=past, return_kv=True)
            new_kv.append(kv)

        text_h, image_h = router.split(h)
        text_h = self.norm(text_h)
        noise_pred = None
        if num_images:
            noise_pred = self.unet_up(image_h.reshape(num_images, -1, h.shape[-1]), timesteps, skip)
        cache = extend_cache(kv_cache, new_kv, layout, cache_image_ids) if use_cache else None
        return _Trunk(router, text_h, noise_pred, cache)

    def _target_logits(self, text_h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits over base vocabulary + BOI/EOI, targets) of the text rows (grouped order) that have a target."""
        valid = targets != -100
        return torch.cat(self.lm_logits(text_h[valid]), dim=-1), targets[valid]

    def _forward_split(
        self,
        input_ids: torch.Tensor,
        layout: TokenLayout,
        split: FrozenSplit,
        images: torch.Tensor | None,
        timesteps: torch.Tensor | None,
        lm_targets: torch.Tensor,
        frozen_lm: bool,
    ) -> FusionOutput:
        """forward with the frozen rows run first, without autograd, as a KV cache the other rows continue."""
        frozen, learning = split.frozen_rows, split.learning_rows
        with torch.no_grad():
            # Padding positions (id 0) are left out of every weight set: their ids are never read.
            prefix = self._trunk(frozen.gather(input_ids, 0), frozen.layout(layout), None, None, None, True,
                                 frozen.valid)
        trunk = self._trunk(learning.gather(input_ids, 0), learning.layout(layout), images, timesteps, prefix.cache,
                            False, learning.valid)
        lm_logits, targets = self._target_logits(trunk.text_h, self._grouped(learning.gather(lm_targets, -100),
                                                                             trunk.router))
        frozen_targets = self._grouped(frozen.gather(lm_targets, -100), prefix.router)
        valid = frozen_targets != -100
        frozen_targets = frozen_targets[valid]
        frozen_logits = None
        if self.special_head.requires_grad or frozen_lm:
            frozen_logits = self._frozen_target_logits(prefix.text_h[valid], frozen_targets)
        return FusionOutput(None, None, trunk.noise_pred, None, None, None, lm_logits, targets, frozen_logits,
                            frozen_targets, split.frozen)

    @staticmethod
    def _grouped(per_position: torch.Tensor, router: ModalityRouter) -> torch.Tensor:
        """(B, S) values -> those of the router's text rows, in grouped order."""
        flat = per_position.reshape(-1)
        return flat if router.text_index is None else flat[router.text_index]

    def _frozen_target_logits(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The (N, 4) reduced logits of FusionOutput.frozen_lm_logits. The base vocabulary enters the loss only
        through its log-sum-exp and the target's logit, both constants here, so its head runs without autograd;
        only the BOI/EOI logits stay in the graph (a trainable special head makes those rows' loss learn)."""
        vocab = self.arch.vocab_size
        with torch.no_grad():
            # At least fp32, as the objective's cross-entropy computes it.
            # The base head alone (lm_logits would compute the BOI/EOI logits a second time); as a module call when
            # untied, like lm_logits, for parameter-gathering hooks.
            head = self.lm_head
            base = head(hidden) if head is not None else nn.functional.linear(hidden, self.lm_head_weight)
            base = base.to(torch.promote_types(base.dtype, torch.float32))
            lse = torch.logsumexp(base, dim=-1, keepdim=True)
            target = base.gather(1, targets.clamp(max=vocab - 1)[:, None])
            target = torch.where(targets[:, None] < vocab, target, torch.zeros_like(target))
        special = nn.functional.linear(hidden, self.special_head).to(base.dtype)
        return torch.cat((lse, target, special), dim=-1)

    def _check_images(
        self, images: torch.Tensor | None, timesteps: torch.Tensor | None, num_images: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if images is None or images.shape[0] != num_images:
            got = "none" if images is None else images.shape[0]
            raise ValueError(f"the layout holds {num_images} images but `images` has {got}")
        if timesteps is None:
            raise ValueError("`timesteps` (one per image) are required when the batch holds images")
        timesteps = torch.as_tensor(timesteps, device=images.device).reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(num_images)
        if timesteps.numel() != num_images:
            raise ValueError(f"got {timesteps.numel()} timesteps for {num_images} images")
        return images, timesteps

    @staticmethod
    def _scatter_logits(
        logits: torch.Tensor, special: torch.Tensor, router: ModalityRouter, text_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if router.num_image == 0:
            return logits.view(router.batch, router.seq, -1), special.view(router.batch, router.seq, -1)
        n = router.batch * router.seq
        full = logits.new_zeros(n, logits.shape[-1]).index_copy(0, text_index, logits)
        full_special = special.new_zeros(n, special.shape[-1]).index_copy(0, text_index, special)
        return full.view(router.batch, router.seq, -1), full_special.view(router.batch, router.seq, -1)

    # ------------------------------------------------------------------ loading and saving
    # Thin entry points of the public API; the file formats live in megafusion/checkpoint/fusion_io.py (the one
    # sanctioned upward import of the model package, see tests/test_import_layers.py).
    @classmethod
    def from_llama(
        cls,
        path: str | os.PathLike,
        separation: str = "deep",
        image: ImageConfig | None = None,
        unet: UNetConfig | None = None,
        dtype: torch.dtype = torch.float32,
        attention: str = "sdpa",
        routing: str = "index",
    ) -> LlamaFusion:
        """Build from an HF Llama directory (config.json + safetensors, sharded or not) or a .gguf file:
        text set = the pretrained LM, image set = a copy of it, U-Nets from scratch."""
        from megafusion.checkpoint.fusion_io import build_from_llama

        return build_from_llama(cls, path, separation, image, unet, dtype, attention, routing)

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """All weights (safetensors) + architecture + diffusion settings + document prefix, written atomically."""
        from megafusion.checkpoint.fusion_io import save_fusion

        return save_fusion(self, out_dir)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None) -> LlamaFusion:
        from megafusion.checkpoint.fusion_io import load_fusion

        return load_fusion(cls, path, dtype)
