"""`megafusion plan`: model-state arithmetic against DeepSpeed's own estimators, the frozen split, the activation
formula against what autograd really saves, which layouts are offered, and the recommendations."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from pathlib import Path

import pytest
import torch

from megafusion.cli import main
from megafusion.config import load_config
from megafusion.model.arch import LlamaArch
from megafusion.model.args import ImageConfig, UNetConfig
from megafusion.model.fusion import LlamaFusion
from megafusion.parallel.memory import (
    GIB,
    Activations,
    ActivationShape,
    Estimate,
    Layout,
    ModelStates,
    deepspeed_states,
    layer_bytes_per_token,
    recommend,
    torch_states,
)
from megafusion.training.plan import (
    Plan,
    _saved_activation_bytes,
    activation_shape,
    build_plan,
    count_parameters,
    format_plan,
    resolve_arch,
    unet_activation_bytes,
)

REPO = Path(__file__).resolve().parents[2]
PAPER_8B = REPO / "configs" / "llama3-8b-paper.yaml"
PAPER_70B = REPO / "configs" / "llama3-70b-paper.yaml"


@pytest.fixture(scope="module")
def params_8b():
    """Exact counts of the paper's LlamaFusion on Llama-3 8B (deep separation, text frozen), from the meta model."""
    cfg = load_config(PAPER_8B)
    arch, _ = resolve_arch(cfg, "llama3-8b")
    with torch.device("meta"):
        model = LlamaFusion(arch, cfg.model.separation, cfg.image, cfg.unet)
    return model, count_parameters(model, train_text=False)


@pytest.fixture(scope="module")
def deepspeed_cpu():
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no GPU here; the estimators themselves are plain arithmetic
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    return stage_1_and_2, stage3


# ------------------------------------------------------------------ model states vs DeepSpeed


@pytest.mark.parametrize("nodes,gpus_per_node", [(1, 1), (1, 8), (8, 8), (16, 8)])
def test_pure_zero_matches_deepspeeds_estimators(params_8b, deepspeed_cpu, nodes, gpus_per_node):
    """With nothing frozen, ZeRO-2 and ZeRO-3 model states are exactly DeepSpeed's numbers (no offload), on the
    same parameter counts: the returned bytes and the table its *_all_cold functions print."""
    stage_1_and_2, stage3 = deepspeed_cpu
    _, split = params_8b
    params = split.all_trainable()
    total, largest, n = params.total.total, params.largest_module, nodes * gpus_per_node
    assert params.total.frozen == 0 and total == split.total.total

    _, ds_z2 = stage_1_and_2.estimate_zero2_model_states_mem_needs(
        total_params=total, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=False)
    _, ds_z3, _ = stage3.estimate_zero3_model_states_mem_needs(
        total_params=total, largest_layer_params=largest, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
        cpu_offload=False, cpu_offload_params=False, zero_init=True)
    ours_z2, ours_z3 = deepspeed_states(params, 2, n).total, deepspeed_states(params, 3, n).total
    assert ours_z2 == pytest.approx(ds_z2, abs=1)  # DeepSpeed truncates to whole bytes
    assert ours_z3 == pytest.approx(ds_z3, abs=1)

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        stage_1_and_2.estimate_zero2_model_states_mem_needs_all_cold(
            total_params=total, num_gpus_per_node=gpus_per_node, num_nodes=nodes)
        stage3.estimate_zero3_model_states_mem_needs_all_cold(
            total_params=total, largest_layer_params=largest, num_gpus_per_node=gpus_per_node, num_nodes=nodes)
    text = printed.getvalue()
    z2_gpu = re.search(r"\|\s*([\d.]+)GB \| offload_optimizer=none\s*$", text, re.MULTILINE)
    z3_gpu = re.search(r"\|\s*([\d.]+)GB \| offload_param=none, offload_optimizer=none, zero_init=1", text)
    assert z2_gpu and z3_gpu, text
    assert f"{ours_z2 / GIB:.2f}" == z2_gpu.group(1)
    assert f"{ours_z3 / GIB:.2f}" == z3_gpu.group(1)


def test_counts_are_deepspeeds_on_a_real_model(deepspeed_cpu):
    """count_parameters' total and largest module are what DeepSpeed derives from a live model (all_live)."""
    _, stage3 = deepspeed_cpu
    arch = LlamaArch(vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16)
    model = LlamaFusion(arch, "deep", ImageConfig(4, 8, 2), UNetConfig(32, 1, 8, 32))
    counts = count_parameters(model, train_text=True)
    assert stage3.model_to_params(model) == (counts.total.total, counts.largest_module)


def test_paper_8b_counts(params_8b):
    """The frozen part is exactly the text group, the trainable part the image group (image set + U-Nets + BOI/EOI)."""
    model, params = params_8b
    groups = model.grouped_parameters()
    assert params.total.frozen == sum(p.numel() for _, p in groups["text"])
    assert params.total.trainable == sum(p.numel() for _, p in groups["image"])
    assert round(params.total.frozen / 1e9, 2) == 8.03  # Llama-3 8B itself
    image_set = sum(p.numel() for n, p in groups["image"] if ".image." in n)
    assert image_set == 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096)
    assert params.largest_module == 128256 * 4096  # embedding / LM head: what ZeRO-3 gathers at once
    # Only the routed projections and the untied embedding / LM head are tensor-parallel.
    assert params.total.frozen_rep == 32 * 2 * 4096 + 4096 and params.total.trainable_tp == image_set - 32 * 2 * 4096


def test_frozen_split_saves_exactly_what_the_arithmetic_says(params_8b):
    _, split = params_8b
    full = split.all_trainable()
    f = split.total.frozen
    for n in (8, 64):
        saved = {stage: deepspeed_states(full, stage, n).total - deepspeed_states(split, stage, n).total
                 for stage in range(4)}
        # Frozen weights keep their 2 bf16 bytes and lose 18 (stage 0: bf16 grad + fp32 grad, master, m, v), or the
        # parts of those each stage keeps per GPU.
        assert saved[0] == pytest.approx(18 * f)
        assert saved[1] == pytest.approx(2 * f + 16 * f / n)
        assert saved[2] == pytest.approx(18 * f / n)
        assert saved[3] == pytest.approx(16 * f / n)
        for tp in (1, 2, 8):
            dp = n // tp
            frozen_rank, _ = split.total.per_tp_rank(tp)
            a, b = torch_states(full, tp, dp), torch_states(split, tp, dp)
            # fp32 weight + grad + Adam (16 bytes) become one bf16 copy (2 bytes), per tp shard per FSDP shard.
            assert (a.total - a.gathered) - (b.total - b.gathered) == pytest.approx(14 * frozen_rank / dp)
    # The README's example: Llama-3 8B deep, one GPU, no ZeRO.
    one = deepspeed_states(split, 0, 1)
    assert one.frozen == 2 * f and one.total == pytest.approx(2 * f + 20 * split.total.trainable)


# ------------------------------------------------------------------ activations vs autograd


def _tiny(layers: int, separation: str, train_text: bool) -> LlamaFusion:
    arch = LlamaArch(vocab_size=100, hidden_size=64, intermediate_size=160, num_layers=layers, num_heads=4,
                     num_kv_heads=2, head_dim=16)
    torch.manual_seed(0)
    model = LlamaFusion(arch, separation, ImageConfig(4, 8, 2), UNetConfig(32, 1, 8, 32))
    if not train_text:
        for name, p in model.named_parameters():
            p.requires_grad_(model.parameter_group(name) == "image")
    return model


@pytest.mark.parametrize("separation", ["deep", "ffn", "none"])
@pytest.mark.parametrize("train_text", [False, True])
def test_layer_formula_is_what_autograd_saves(separation, train_text):
    """One more layer adds exactly layer_bytes_per_token x tokens of saved tensors (fp32 run on CPU, text and image
    rows mixed; the dense mask of the sdpa backend included)."""
    seq, image_at = 128, 40
    ids = torch.randint(0, 100, (1, seq), generator=torch.Generator().manual_seed(0))
    modality = torch.zeros(1, seq, dtype=torch.long)
    modality[0, image_at:image_at + 16] = 1
    images = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    saved = []
    for layers in (1, 2):
        model = _tiny(layers, separation, train_text)
        saved.append(_saved_activation_bytes(model, lambda m=model: m(
            ids, modality=modality, images=images, timesteps=torch.tensor([3]), compute_logits=False)))
    cfg = load_config(None, {"model.separation": separation, "optim.lr_text": 1e-5 if train_text else 0.0,
                             "data.max_len": seq, "image.latent_channels": 4, "image.latent_size": 8})
    shape = dataclasses.replace(activation_shape(cfg, model.arch, 0.0), act_bytes=4)
    assert saved[1] - saved[0] == pytest.approx(seq * layer_bytes_per_token(shape, 16 / seq))


def test_unet_measurement_on_meta_equals_a_real_run():
    arch = LlamaArch(vocab_size=100, hidden_size=64, intermediate_size=160, num_layers=1, num_heads=4,
                     num_kv_heads=2, head_dim=16)
    image, unet = ImageConfig(4, 8, 2), UNetConfig(32, 2, 8, 32)
    with torch.device("meta"):
        meta = LlamaFusion(arch, "deep", image, unet)
    real = LlamaFusion(arch, "deep", image, unet)
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([7])
    tokens, skip = real.unet_down(latents, t)
    expected = _saved_activation_bytes(real.unet_down, lambda: real.unet_down(latents, t))
    expected += _saved_activation_bytes(real.unet_up, lambda: real.unet_up(tokens.detach().requires_grad_(), t,
                                                                          skip.detach()))
    assert unet_activation_bytes(meta, torch.float32) == expected > 0


def test_checkpointing_keeps_one_input_per_layer():
    shape = ActivationShape(hidden=4096, q_dim=4096, kv_dim=1024, ffn=14336, heads=32, layers=32, vocab=128258,
                            seq_len=4096, tokens_per_image=256, text_attn_trainable=False, text_ffn_trainable=False,
                            image_attn_trainable=True, image_ffn_trainable=True)
    from megafusion.parallel.memory import activations

    act = activations(shape, 4096, 0.5)
    assert act.layers == pytest.approx(32 * 4096 * layer_bytes_per_token(shape, 0.5))
    assert act.layers_checkpointed == pytest.approx(32 * 4096 * 2 * 4096 + 4096 * layer_bytes_per_token(shape, 0.5))
    # Megatron's per-layer count for a GPT layer is 34 s b h bytes; this Llama layer (SwiGLU 3.5h wide, fp32 norm
    # copies) is of that order, and tensor parallelism divides only the part inside the parallel region.
    per_image_token = layer_bytes_per_token(shape, 1.0)
    assert 34 * 4096 < per_image_token < 60 * 4096
    assert layer_bytes_per_token(shape, 1.0, tp=8) > 16 * 4096  # norms and projection inputs stay replicated


# ------------------------------------------------------------------ layouts and recommendations


def test_tp_that_does_not_divide_the_heads_is_not_offered():
    cfg = load_config(REPO / "configs" / "smollm2-135m-deep.yaml")  # 9 query heads, 3 key/value heads
    plan = build_plan(cfg, 8, 80)
    offered = {e.layout.tp for e in plan.estimates if e.layout.engine == "torch"}
    assert offered == {1}
    assert set(plan.excluded_tp) == {2, 4, 8} and "heads" in plan.excluded_tp[2]

    cfg8b = load_config(PAPER_8B)
    assert {e.layout.tp for e in build_plan(cfg8b, 8, 80).estimates} == {1, 2, 4, 8}
    small = build_plan(cfg8b, 4, 80, gpus_per_node=4)  # tp stays inside a node and divides the GPUs
    assert {e.layout.tp for e in small.estimates} == {1, 2, 4} and 8 in small.excluded_tp


def test_triton_routing_keeps_tp_out():
    cfg = load_config(PAPER_8B, ["--model.routing=triton"])
    plan = build_plan(cfg, 8, 80)
    assert {e.layout.tp for e in plan.estimates} == {1} and "model.routing" in plan.excluded_tp[2]


def _recommended(path: Path, gpus: int) -> tuple[Estimate, bool, Plan]:
    plan = build_plan(load_config(path), gpus, 80)
    assert plan.recommended is not None
    return (*plan.recommended, plan)


def test_llama3_8b_on_one_node_of_h100s():
    """Stages 0-2 keep the 16 GB frozen copy and the trainable weights whole on every GPU; at 8 GPUs ZeRO-2 ends
    just over the budget, so weights are sharded (ZeRO-3, gathered over NVLink) rather than recomputing every
    layer."""
    best, ckpt, plan = _recommended(PAPER_8B, 8)
    assert (best.layout.name, ckpt) == ("deepspeed zero-3 dp8", False)
    by_name = {e.layout.name: e for e in plan.estimates}
    assert by_name["deepspeed zero-2 dp8"].total > plan.budget >= best.total
    assert by_name["deepspeed zero-2 dp8"].total_checkpointed <= plan.budget


def test_llama3_8b_on_eight_nodes():
    """At 64 GPUs ZeRO-2's optimizer shard is small enough: no weight gathers across nodes, no recomputation."""
    best, ckpt, plan = _recommended(PAPER_8B, 64)
    assert (best.layout.name, ckpt) == ("deepspeed zero-2 dp64", False)
    assert next(e for e in plan.estimates if e.layout.zero_stage == 1).total > plan.budget


def test_llama3_70b_on_eight_nodes():
    """139B parameters (70.6B frozen): only full sharding holds the model states, and at 4096 tokens per GPU the
    activations of 80 layers (130 GiB) need checkpointing at any tp below 8; tp1 with ZeRO-3 is the recipe."""
    best, ckpt, plan = _recommended(PAPER_70B, 64)
    assert (best.layout.name, ckpt) == ("deepspeed zero-3 dp64", True)
    assert all(e.total > plan.budget for e in plan.estimates)
    assert round(plan.params.total.total / 1e9) == 139


def _fake(tp: int, stage: int, total: float, ckpt: float, engine: str = "torch") -> Estimate:
    return Estimate(Layout(engine, stage, tp, 8 // tp), ModelStates(0, 0, 0, 0),
                    Activations(layers=total, layers_checkpointed=ckpt, unet=0, logits=0))


def test_recommendation_rule():
    # A smaller tp with checkpointing beats a larger tp without; at one tp no recomputation beats less sharding.
    assert recommend([_fake(2, 3, 10, 5), _fake(1, 3, 20, 5)], 8) == (_fake(1, 3, 20, 5), True)
    assert recommend([_fake(1, 1, 20, 5, "deepspeed"), _fake(1, 3, 7, 5, "deepspeed")], 8)[0].layout.zero_stage == 3
    # Equal sharding: the DeepSpeed engine first.
    assert recommend([_fake(1, 3, 7, 5), _fake(1, 3, 7, 5, "deepspeed")], 8)[0].layout.engine == "deepspeed"
    assert recommend([_fake(1, 3, 10, 9)], 8) is None


# ------------------------------------------------------------------ command line


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_cli_prints_the_table_and_applies_overrides():
    rc, out, _ = _run("plan", "--config", str(PAPER_8B), "--gpus", "8", "--gpu-memory-gb", "80")
    assert rc == 0
    assert "llama3-8b (preset, named by model.base /path/to/Meta-Llama-3-8B" in out
    assert "recommended: deepspeed zero-3 dp8, no activation checkpointing" in out
    assert "--train.engine=deepspeed --train.zero_stage=3 --train.activation_checkpointing=false" in out
    assert len([line for line in out.splitlines() if line.startswith(("deepspeed zero-", "torch tp"))]) == 8

    rc, out, _ = _run("plan", "--config", str(PAPER_8B), "--gpus", "8", "--gpu-memory-gb", "80",
                      "--optim.lr_text=1e-5", "--micro-batch-tokens", "8192")
    assert rc == 0 and "text trainable" in out and "8192 tokens per micro-batch" in out


def test_cli_names_the_missing_base(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model:\n  base: /nowhere/my-llama\n")
    rc, _, err = _run("plan", "--config", str(cfg), "--gpus", "8", "--gpu-memory-gb", "80")
    assert rc == 2 and "model.base" in err and "--arch" in err
    rc, out, _ = _run("plan", "--config", str(cfg), "--gpus", "8", "--gpu-memory-gb", "80", "--arch", "smollm2-135m")
    assert rc == 0 and "smollm2-135m (preset)" in out


def test_format_plan_mentions_what_nothing_fits():
    plan = build_plan(load_config(PAPER_70B), 8, 80)
    assert plan.recommended is None and "nothing fits" in format_plan(plan)
