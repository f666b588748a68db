"""The Llama architecture hyperparameters megafusion understands, read from an HF `config.json` dict."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "llama3")


class UnsupportedCheckpointError(ValueError):
    """The checkpoint is readable but describes a model megafusion cannot reproduce exactly."""


@dataclass
class LlamaArch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or the llama3 scaling parameters (factor, low/high_freq_factor, original_max_position_embeddings).
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedCheckpointError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> LlamaArch:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedCheckpointError(
                f"{source}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES} "
                "(a Llama-family causal LM)"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise UnsupportedCheckpointError(f"{source}: {flag}=true is not supported (Llama has no biases)")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedCheckpointError(f"{source}: hidden_act {act!r} is not supported; expected 'silu'")
        if cfg.get("pretraining_tp", 1) != 1:
            raise UnsupportedCheckpointError(f"{source}: pretraining_tp != 1 is not supported")
        missing = [
            k
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if k not in cfg
        ]
        if missing:
            raise UnsupportedCheckpointError(f"{source}: missing required keys {missing}")

        # transformers >= 5 nests rope settings in `rope_parameters`; older configs use rope_theta/rope_scaling.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedCheckpointError(
                f"{source}: rope type {rope_type!r} is not supported; expected one of {SUPPORTED_ROPE_TYPES}"
            )
        rope_scaling = None
        if rope_type == "llama3":
            needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            absent = [k for k in needed if k not in rope]
            if absent:
                raise UnsupportedCheckpointError(f"{source}: llama3 rope scaling lacks {absent}")
            rope_scaling = {k: float(rope[k]) for k in needed}

        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            hf_config={k: v for k, v in cfg.items() if k != "quantization_config"},
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LlamaArch:
        return cls(**data)
