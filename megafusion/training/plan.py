"""`megafusion plan`: per-GPU memory of a run config on N GPUs for each candidate parallel layout, and the one
to use.

    megafusion plan --config configs/llama3-8b-paper.yaml --gpus 64 --gpu-memory-gb 80 [--micro-batch-tokens T]

Parameter counts are exact: the LlamaFusion of the config is built on the meta device (no memory) and every
parameter is classified by `LlamaFusion.parameter_group` (frozen when its group's learning rate is 0) and by
whether tensor parallelism shards it. The U-Nets' activations are measured the same way (a forward on the meta
device, summing what autograd saves). The formulas and the recommendation rule are in megafusion/parallel/memory.py.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch, the model and the parallel engine are imported inside the functions: `megafusion --help` builds every
# subcommand's parser, and the CLI keeps that cheap (megafusion/inference/cli.py does the same).
if TYPE_CHECKING:
    import torch
    from torch import nn

    from megafusion.config import MegaFusionConfig
    from megafusion.model.arch import LlamaArch
    from megafusion.model.fusion import LlamaFusion
    from megafusion.parallel.memory import ActivationShape, Estimate, Layout, ModelParams

# HF config.json values of the bases a plan can name without having the checkpoint (the paper configs point
# model.base at directories that exist only on a cluster). Copied from each model's config.json on the Hub.
ARCH_PRESETS: dict[str, dict[str, Any]] = {
    # meta-llama/Meta-Llama-3-8B
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False),
    # meta-llama/Meta-Llama-3-70B
    "llama3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5,
                       rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False),
    # HuggingFaceTB/SmolLM2-135M-Instruct (the base `megafusion fetch-base smollm2-135m` converts)
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                         rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True),
}
# Hub repository names of the presets: a config whose model.base is not on this machine but ends in one of these
# (e.g. /path/to/Meta-Llama-3-8B) is planned with that preset, and the output says so.
PRESET_ALIASES = {
    "meta-llama-3-8b": "llama3-8b", "meta-llama-3-8b-instruct": "llama3-8b",
    "meta-llama-3-70b": "llama3-70b", "meta-llama-3-70b-instruct": "llama3-70b",
    "smollm2-135m-instruct": "smollm2-135m",
}
DEFAULT_IMAGE_FRACTION = 0.8
DEFAULT_MARGIN = 0.1
GPUS_PER_NODE = 8
TP_CANDIDATES = (1, 2, 4, 8)


def resolve_arch(cfg: MegaFusionConfig, arch: str | None = None) -> tuple[LlamaArch, str]:
    """The architecture to plan for and where it came from: `arch` (a preset name or an HF directory /
    config.json), else model.base when it is a preset, a builtin, a directory with a config.json, or a path that
    does not exist here whose last component is a preset's Hub name (PRESET_ALIASES)."""
    from megafusion.model.arch import LlamaArch

    spec = arch or cfg.model.base
    where = "--arch" if arch else "model.base"
    if spec in ARCH_PRESETS:
        return LlamaArch.from_hf_config(ARCH_PRESETS[spec], f"preset {spec}"), f"{spec} (preset)"
    if spec.startswith("builtin:"):
        from megafusion.checkpoint.builtin_bases import BUILTINS

        name = spec.removeprefix("builtin:")
        if name in BUILTINS:
            return LlamaArch.from_hf_config({"model_type": "llama", **BUILTINS[name]}, spec), spec
    path = Path(spec).expanduser()
    config_json = path / "config.json" if path.is_dir() else path
    if spec and config_json.is_file() and config_json.suffix == ".json":
        return LlamaArch.from_hf_config(json.loads(config_json.read_text()), str(config_json)), str(config_json)
    alias = PRESET_ALIASES.get(path.name.lower())
    if alias and not arch and not path.exists():
        return (LlamaArch.from_hf_config(ARCH_PRESETS[alias], f"preset {alias}"),
                f"{alias} (preset, named by model.base {spec}, not on this machine)")
    raise ValueError(
        f"{where}: {spec!r} is neither an architecture preset ({', '.join(ARCH_PRESETS)}) nor a directory with a "
        "config.json; pass --arch NAME to plan for a base that is not on this machine"
    )


def text_trainable(cfg: MegaFusionConfig) -> bool:
    return cfg.optim.lr_text > 0  # build_optimizer freezes a group whose learning rate is 0


def _tp_sharded(name: str, param: nn.Parameter, tied: bool) -> bool:
    """Mirrors megafusion/parallel/tensor_parallel.py: every routed projection (the 2-D weights inside a block)
    and an untied embedding / LM head; norms, U-Nets, BOI/EOI rows and a tied embedding are replicated."""
    if name.startswith("layers."):
        return param.ndim == 2
    return name in ("embed_tokens.weight", "lm_head.weight") and not tied


def count_parameters(model: LlamaFusion, train_text: bool, keep: Callable[[str], bool] | None = None) -> ModelParams:
    """Exact per-category counts of `model` (meta tensors are fine: only shapes are read); with `keep`, of the
    parameters whose name it accepts (one pipeline stage)."""
    from megafusion.parallel.memory import ModelParams, ParamSplit

    tied = model.lm_head is None
    blocks: dict[str, ParamSplit] = {}
    root = ParamSplit()
    for name, p in model.named_parameters():
        if keep is not None and not keep(name):
            continue
        trainable = train_text or model.parameter_group(name) == "image"
        tp = _tp_sharded(name, p, tied)
        n = p.numel()
        part = ParamSplit(frozen_tp=n * (tp and not trainable), frozen_rep=n * (not tp and not trainable),
                          trainable_tp=n * (tp and trainable), trainable_rep=n * (not tp and trainable))
        if name.startswith("layers."):
            key = ".".join(name.split(".")[:2])
            blocks[key] = blocks.get(key, ParamSplit()) + part
        else:
            root = root + part
    total = root
    for block in blocks.values():
        total = total + block
    largest_block = max(blocks.values(), key=lambda b: b.total, default=ParamSplit())
    # DeepSpeed's estimate_zero3_model_states_mem_needs_all_live: the most parameters one module holds directly.
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ModelParams(total=total, block=largest_block, root=root, largest_module=largest_module)


def _saved_activation_bytes(module: nn.Module, run: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves for backward while `run` executes, parameters excluded, each storage
    once (a saved view keeps its whole base alive)."""
    import torch

    params = {id(p) for p in module.parameters()}
    kept: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        if id(base) not in params:
            kept[id(base)] = base  # holding it keeps the id unique until we are done
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(t.numel() * t.element_size() for t in kept.values())


def unet_activation_bytes(model: LlamaFusion, dtype: torch.dtype | None = None) -> int:
    """Saved activations of U-Net down + up for one image (bf16 unless `dtype`), measured by a forward on the
    meta device."""
    import torch

    dtype = dtype or torch.bfloat16
    image = model.image_config
    down, up = model.unet_down.to(dtype), model.unet_up.to(dtype)
    with torch.device("meta"):
        latents = torch.empty(1, image.latent_channels, image.latent_size, image.latent_size, dtype=dtype)
        timesteps = torch.zeros(1, dtype=torch.long)
        tokens, skip = down(latents, timesteps)
        saved = _saved_activation_bytes(down, lambda: down(latents, timesteps))
        saved += _saved_activation_bytes(up, lambda: up(tokens.detach().requires_grad_(), timesteps, skip.detach()))
    return saved


def activation_shape(cfg: MegaFusionConfig, arch: LlamaArch, unet_bytes_per_image: float) -> ActivationShape:
    from megafusion.model.block import SEPARATED_PARTS
    from megafusion.model.fusion import NUM_SPECIAL_TOKENS
    from megafusion.parallel.memory import ActivationShape

    parts = SEPARATED_PARTS[cfg.model.separation]
    train_text = text_trainable(cfg)
    return ActivationShape(
        hidden=arch.hidden_size, q_dim=arch.num_heads * arch.head_dim, kv_dim=arch.num_kv_heads * arch.head_dim,
        ffn=arch.intermediate_size, heads=arch.num_heads, layers=arch.num_layers,
        vocab=arch.vocab_size + NUM_SPECIAL_TOKENS, seq_len=cfg.data.max_len,
        tokens_per_image=cfg.image.tokens_per_image,
        text_attn_trainable=train_text, text_ffn_trainable=train_text,
        # Without a separate image set, image rows run through the shared set of the text group.
        image_attn_trainable=parts["attention"] or train_text, image_ffn_trainable=parts["ffn"] or train_text,
        unet_bytes_per_image=unet_bytes_per_image,
        dense_mask=cfg.model.attention == "sdpa",
        grouped_gemm=cfg.model.routing in ("triton", "auto"),  # auto picks the grouped GEMM on CUDA
    )


@dataclass
class Plan:
    config: str
    arch: LlamaArch
    arch_source: str
    cfg: MegaFusionConfig
    params: ModelParams
    image_group: dict[str, int]
    shape: ActivationShape
    tokens: int
    image_fraction: float
    num_gpus: int
    gpus_per_node: int
    gpu_memory_gib: float
    margin: float
    estimates: list[Estimate]
    excluded_tp: dict[int, str]
    recommended: tuple[Estimate, bool] | None

    @property
    def budget(self) -> float:
        return self.gpu_memory_gib * 2**30 * (1 - self.margin)


def build_plan(
    cfg: MegaFusionConfig,
    num_gpus: int,
    gpu_memory_gib: float,
    *,
    config_name: str = "",
    arch: str | None = None,
    micro_batch_tokens: int | None = None,
    image_fraction: float = DEFAULT_IMAGE_FRACTION,
    gpus_per_node: int = GPUS_PER_NODE,
    margin: float = DEFAULT_MARGIN,
) -> Plan:
    import torch

    from megafusion.model.fusion import LlamaFusion
    from megafusion.parallel.memory import candidate_layouts, estimate, recommend, tp_degrees
    from megafusion.parallel.mesh import MeshLayout, check_parallel_support

    if num_gpus < 1:
        raise ValueError(f"--gpus: must be >= 1, got {num_gpus}")
    if gpu_memory_gib <= 0:
        raise ValueError(f"--gpu-memory-gb: must be > 0, got {gpu_memory_gib}")
    if not 0 <= margin < 1:
        raise ValueError(f"--margin: must be in [0, 1), got {margin}")
    if not 0 <= image_fraction <= 1:
        raise ValueError(f"--image-fraction: must be in [0, 1], got {image_fraction}")
    tokens = micro_batch_tokens or cfg.train.micro_batch_size * cfg.data.max_len
    if tokens < 1:
        raise ValueError(f"--micro-batch-tokens: must be >= 1, got {tokens}")
    llama, source = resolve_arch(cfg, arch)
    with torch.device("meta"):
        model = LlamaFusion(llama, cfg.model.separation, cfg.image, cfg.unet)
    params = count_parameters(model, text_trainable(cfg))
    image_group: dict[str, int] = {"image set": 0, "U-Nets": 0, "BOI/EOI": 0}
    for name, p in model.named_parameters():
        if model.parameter_group(name) == "image":
            kind = "U-Nets" if name.startswith(("unet_down.", "unet_up.")) else (
                "image set" if ".image." in name else "BOI/EOI")
            image_group[kind] += p.numel()
    shape = activation_shape(cfg, llama, unet_activation_bytes(model))

    tps, excluded = [], {}
    for tp in tp_degrees(num_gpus, gpus_per_node, TP_CANDIDATES):
        try:  # the torch engine's own validation, so the plan never offers a layout a run would refuse
            layout = MeshLayout(tp=tp).resolve(num_gpus, llama)
            check_parallel_support(layout, engine="torch", attention=cfg.model.attention, routing=cfg.model.routing)
        except ValueError as err:
            excluded[tp] = str(err)
            continue
        tps.append(tp)
    for tp in TP_CANDIDATES:
        if tp not in tps and tp not in excluded:
            excluded[tp] = f"needs {tp} GPUs in one node dividing {num_gpus}"
    estimates = [estimate(layout, params, shape, tokens, image_fraction) for layout in candidate_layouts(num_gpus, tps)]
    estimates += pipeline_estimates(model, cfg, shape, num_gpus, tps, tokens, image_fraction)
    plan = Plan(config_name, llama, source, cfg, params, image_group, shape, tokens, image_fraction, num_gpus,
                gpus_per_node, gpu_memory_gib, margin, estimates, excluded, None)
    plan.recommended = recommend(estimates, plan.budget)
    return plan


PP_CANDIDATES = (2, 4, 8)


@dataclass(frozen=True)
class PipelineLayout:
    """A torch-engine layout with pp pipeline stages (Layout's fields plus pp and the schedule)."""

    engine: str
    zero_stage: int
    tp: int
    dp: int
    pp: int
    schedule: str
    # train.grad_accum_steps the run needs (a schedule call has at least pp micro-batches); 0 = the config's.
    grad_accum_steps: int = 0

    @property
    def name(self) -> str:
        fsdp = f" x fsdp{self.dp}" if self.dp > 1 else ""
        return f"torch pp{self.pp} x tp{self.tp}{fsdp}"

    @property
    def overrides(self) -> str:
        accum = f" --train.grad_accum_steps={self.grad_accum_steps}" if self.grad_accum_steps else ""
        return (f"--train.engine=torch --parallel.pp={self.pp} --parallel.pp_schedule={self.schedule} "
                f"--parallel.tp={self.tp} --parallel.dp_shard=-1{accum}")


def pipeline_estimates(model: LlamaFusion, cfg: MegaFusionConfig, shape: ActivationShape, num_gpus: int,
                       tps: list[int], tokens: int, image_fraction: float) -> list[Estimate]:
    """Per-GPU memory of the heaviest stage for pp in PP_CANDIDATES (even layer split, parallel.pp_schedule of the
    config, 1F1B unless it says gpipe). A stage holds its layers (+ embedding and U-Net down on the first, LM head
    and U-Net up on the last: its parameters are counted exactly) and the saved activations of the micro-batches in
    flight on it: stage s of p keeps min(m, p - s) under 1F1B, all m under GPipe (m = train.grad_accum_steps, the
    schedule's micro-batches)."""
    from dataclasses import replace

    from megafusion.parallel.memory import Activations, Estimate, activations, layout_states
    from megafusion.parallel.pipeline_split import even_split

    schedule = "gpipe" if cfg.parallel.pp_schedule == "gpipe" else "1f1b"
    configured = cfg.parallel.pp_microbatches or cfg.train.grad_accum_steps
    tied = model.lm_head is None
    out = []
    for tp in tps:
        for pp in PP_CANDIDATES:
            if num_gpus % (tp * pp) or pp > shape.layers:
                continue
            dp = num_gpus // (tp * pp)
            m = max(configured, pp)  # plan_pipeline refuses fewer micro-batches than stages
            layout = PipelineLayout("torch", 3, tp, dp, pp, schedule,
                                    m if m != cfg.train.grad_accum_steps else 0)
            heaviest, start = None, 0
            for s, count in enumerate(even_split(shape.layers, pp)):
                first, last, layers = s == 0, s == pp - 1, range(start, start + count)
                start += count
                stage_params = count_parameters(model, text_trainable(cfg), _stage_names(layers, first, last, tied))
                in_flight = m if schedule == "gpipe" else min(m, pp - s)
                act = activations(replace(shape, layers=count), tokens, image_fraction, tp)
                act = Activations(layers=act.layers * in_flight,
                                  layers_checkpointed=act.layers_checkpointed * in_flight,
                                  unet=act.unet * in_flight if first or last else 0.0,
                                  logits=act.logits * in_flight if last else 0.0)
                e = Estimate(layout, layout_states(layout, stage_params), act)  # type: ignore[arg-type]
                if heaviest is None or e.total_checkpointed > heaviest.total_checkpointed:
                    heaviest = e
            out.append(heaviest)
    return out


def _stage_names(layers: range, first: bool, last: bool, tied: bool) -> Callable[[str], bool]:
    def keep(name: str) -> bool:
        if name.startswith("layers."):
            return int(name.split(".")[1]) in layers
        if name.startswith(("embed_tokens.", "special_embed", "unet_down.")):
            return first or (last and tied and name.startswith("embed_tokens."))
        return last  # norm, lm_head, special_head, unet_up
    return keep


def _b(n: float) -> str:
    """A parameter count the way model cards write it."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _overrides(layout: Layout, checkpointing: bool) -> str:
    return f"{layout.overrides} --train.activation_checkpointing={'true' if checkpointing else 'false'}"


def format_plan(plan: Plan) -> str:
    from megafusion.parallel.memory import GIB, LOGITS_BYTES, row_bytes, shared_bytes

    p, s, arch = plan.params.total, plan.shape, plan.arch
    frozen_note = "text trainable (optim.lr_text > 0)" if p.frozen == 0 else "text frozen (optim.lr_text = 0)"
    image_parts = ", ".join(f"{k} {_b(v)}" for k, v in plan.image_group.items() if v)
    images = plan.tokens * plan.image_fraction / s.tokens_per_image
    seqs = plan.tokens / s.seq_len
    shared = shared_bytes(s, plan.image_fraction)
    lines = [
        f"megafusion plan: {plan.config or 'config'} on {plan.num_gpus} GPUs x {plan.gpu_memory_gib:g} GiB "
        f"({plan.gpus_per_node} per node); budget {plan.budget / GIB:.1f} GiB per GPU ({plan.margin:.0%} margin)",
        f"model: {plan.arch_source}: {arch.num_layers} layers, hidden {arch.hidden_size}, FFN "
        f"{arch.intermediate_size}, {arch.num_heads}/{arch.num_kv_heads} heads, vocab {arch.vocab_size}; "
        f"separation {plan.cfg.model.separation}, {frozen_note}",
        f"parameters: {_b(p.total)} = {_b(p.frozen)} frozen + {_b(p.trainable)} trainable ({image_parts}); "
        f"bf16 mixed precision, AdamW",
        f"activations: {plan.tokens} tokens per micro-batch per data-parallel rank ({seqs:g} x {s.seq_len}), "
        f"{plan.image_fraction:.0%} image tokens ({images:g} images of {s.tokens_per_image}), attention "
        f"{plan.cfg.model.attention}",
        f"  saved per layer at tp1: {(row_bytes(s, True) + shared) / 1024:.0f} KiB per image token, "
        f"{(row_bytes(s, False) + shared) / 1024:.0f} KiB per text token, {s.act_bytes * s.hidden / 1024:.0f} KiB "
        f"with checkpointing; U-Nets {s.unet_bytes_per_image / 2**20:.0f} MiB per image; loss "
        f"{LOGITS_BYTES * s.vocab / 2**20:.2f} MiB per text token",
    ]
    if plan.excluded_tp:
        lines.append("tp not offered: " + "; ".join(f"tp{tp}: {why}" for tp, why in sorted(plan.excluded_tp.items())))
    head = (f"{'per GPU, GiB':<26}{'frozen':>7}{'weights':>8}{'grads':>7}{'optim':>7}{'gather':>7} |"
            f"{'states':>7} |{'activ':>7}{'+ckpt':>7} |{'total':>7}{'+ckpt':>7} | fits")
    lines += ["", head, "-" * len(head)]
    for e in plan.estimates:
        st, act = e.states, e.activations
        cells = "".join(f"{c / GIB:>{w}.1f}" for c, w in zip(
            (st.frozen, st.weights, st.grads, st.optimizer, st.gathered), (7, 8, 7, 7, 7), strict=True))
        lines.append(
            f"{e.layout.name:<26}{cells} |{st.total / GIB:>7.1f} |{act.total / GIB:>7.1f}"
            f"{act.total_checkpointed / GIB:>7.1f} |{e.total / GIB:>7.1f}{e.total_checkpointed / GIB:>7.1f} | "
            f"{e.fits(plan.budget)}"
        )
    lines += textwrap.wrap(
        "frozen: bf16 frozen weights; weights: trainable ones (bf16 on DeepSpeed, the fp32 sharded master on the torch "
        "engine); grads: bf16 + fp32 (DeepSpeed) or fp32 shards; optim: fp32 master + Adam m, v (DeepSpeed) or Adam "
        "m, v; gather: ZeRO-3 / FSDP2 parameters gathered for compute; +ckpt: with activation checkpointing; fits: "
        "yes / ckpt (only with checkpointing) / no", width=len(head))
    lines.append("")
    if plan.recommended is None:
        lines.append(f"recommended: nothing fits {plan.budget / GIB:.1f} GiB per GPU; use more GPUs, fewer "
                     "--micro-batch-tokens, or larger GPUs")
    else:
        best, ckpt = plan.recommended
        used = best.total_checkpointed if ckpt else best.total
        lines.append(
            f"recommended: {best.layout.name}, {'with' if ckpt else 'no'} activation checkpointing: "
            f"{used / GIB:.1f} of {plan.budget / GIB:.1f} GiB per GPU"
        )
        lines.append("  rule: fewest tensor-parallel ranks, then no recomputation, then the least sharding "
                     "(megafusion/parallel/memory.py)")
        lines.append(f"  run-config overrides (any launcher): {_overrides(best.layout, ckpt)}")
        per_token = (best.activations.total_checkpointed if ckpt else best.activations.total) / plan.tokens
        most = int((plan.budget - best.states.total) / per_token)
        lines.append(f"  with this layout a micro-batch of up to {most} tokens ({most // s.seq_len} x {s.seq_len}) per "
                     "data-parallel rank fits the budget")
    return "\n".join(lines)


def plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megafusion plan", description=__doc__.split("\n\n")[0],
                                epilog="Any --section.key=value after these overrides the run config.")
    p.add_argument("--config", required=True, help="YAML run config (path or packaged name)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu-memory-gb", type=float, required=True, help="memory of one GPU in GiB (H100 80GB: 80)")
    p.add_argument("--micro-batch-tokens", type=int, default=None,
                   help="tokens per micro-batch per data-parallel rank (default train.micro_batch_size x "
                   "data.max_len)")
    p.add_argument("--arch", default=None, help=f"architecture preset ({', '.join(ARCH_PRESETS)}) or an HF "
                   "directory; default: model.base")
    p.add_argument("--image-fraction", type=float, default=DEFAULT_IMAGE_FRACTION,
                   help="share of image tokens in a micro-batch (default 0.8: a 256-token image per ~64-token "
                   "caption)")
    p.add_argument("--gpus-per-node", type=int, default=GPUS_PER_NODE, help="tensor parallel stays inside a node")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help="share of GPU memory kept free for what the estimate leaves out (default 0.1)")
    return p


def run_plan_command(argv: list[str]) -> int:
    """`megafusion plan ARGS`: the options above, then run-config overrides."""
    from megafusion.config import load_config

    parser = plan_parser()
    args, overrides = parser.parse_known_args(argv)
    stray = [a for a in overrides if not a.startswith("--") or "." not in a.split("=")[0]]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    cfg = load_config(args.config, overrides)
    plan = build_plan(
        cfg, args.gpus, args.gpu_memory_gb, config_name=args.config, arch=args.arch,
        micro_batch_tokens=args.micro_batch_tokens, image_fraction=args.image_fraction,
        gpus_per_node=args.gpus_per_node, margin=args.margin,
    )
    print(format_plan(plan))
    return 0
