"""The mapping between HF Llama tensor names and LlamaFusion's text (or shared) parameter set."""

from __future__ import annotations

import torch
from torch import nn

_LAYER_MAP = {
    "input_layernorm.weight": "attn_in.{set}.norm.weight",
    "self_attn.q_proj.weight": "attn_in.{set}.q_proj.weight",
    "self_attn.k_proj.weight": "attn_in.{set}.k_proj.weight",
    "self_attn.v_proj.weight": "attn_in.{set}.v_proj.weight",
    "self_attn.o_proj.weight": "attn_out.{set}.weight",
    "post_attention_layernorm.weight": "ffn.{set}.norm.weight",
    "mlp.gate_proj.weight": "ffn.{set}.gate_proj.weight",
    "mlp.up_proj.weight": "ffn.{set}.up_proj.weight",
    "mlp.down_proj.weight": "ffn.{set}.down_proj.weight",
}
# Tensors some checkpoints carry that hold no learned state.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_to_fusion_names(model: nn.Module) -> dict[str, str]:
    """HF name -> LlamaFusion parameter name of the text set (`shared` where the arm has no separation)."""
    names = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"}
    if model.lm_head is not None:
        names["lm_head.weight"] = "lm_head.weight"
    for i, layer in enumerate(model.layers):
        sets = {
            "attn_in": "text" if layer.attn_in.separate else "shared",
            "attn_out": "text" if layer.attn_out.separate else "shared",
            "ffn": "text" if layer.ffn.separate else "shared",
        }
        for hf_suffix, ours in _LAYER_MAP.items():
            part = ours.split(".", 1)[0]
            names[f"model.layers.{i}.{hf_suffix}"] = f"layers.{i}." + ours.format(set=sets[part])
    return names


def load_text_state(model: nn.Module, hf_state: dict[str, torch.Tensor], source: str) -> None:
    """Copy a pretrained HF Llama state dict into the text set; every mismatch names the tensor and file."""
    mapping = hf_to_fusion_names(model)
    params = dict(model.named_parameters())
    unexpected = [k for k in hf_state if k not in mapping and not k.endswith(IGNORED_SUFFIXES)]
    if model.lm_head is None and "lm_head.weight" in unexpected:
        # Some tied checkpoints also store the (identical) head; the embedding stays the source of truth.
        unexpected.remove("lm_head.weight")
    if unexpected:
        raise ValueError(
            f"{source}: holds tensors the config does not describe, e.g. {unexpected[:3]} "
            "(config.json does not match the weights)"
        )
    missing = [k for k in mapping if k not in hf_state]
    if missing:
        raise ValueError(f"{source}: missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    with torch.no_grad():
        for hf_name, ours in mapping.items():
            tensor, param = hf_state[hf_name], params[ours]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"{source}: tensor {hf_name} has shape {tuple(tensor.shape)}, but config.json implies "
                    f"{tuple(param.shape)}"
                )
            param.copy_(tensor.to(param.dtype))


def text_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The text set under HF Llama names (what `transformers.LlamaForCausalLM` loads)."""
    params = dict(model.named_parameters())
    return {hf: params[ours].detach().contiguous() for hf, ours in hf_to_fusion_names(model).items()}
