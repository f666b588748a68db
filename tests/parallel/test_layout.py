"""MeshLayout validation and the refusal of unusable combinations: checked before any process group exists, with
messages that name the run config's keys."""

from __future__ import annotations

import pytest

from megafusion.model.arch import LlamaArch
from megafusion.parallel import MeshLayout, check_parallel_support


def arch(heads: int = 8, kv_heads: int = 4, ffn: int = 96) -> LlamaArch:
    return LlamaArch(vocab_size=100, hidden_size=64, intermediate_size=ffn, num_layers=2, num_heads=heads,
                     num_kv_heads=kv_heads, head_dim=8)


@pytest.mark.parametrize(("layout", "world", "expected"), [
    (MeshLayout(tp=2), 8, MeshLayout(1, 4, 2)),
    (MeshLayout(dp_replicate=2, tp=2), 8, MeshLayout(2, 2, 2)),
    (MeshLayout(dp_replicate=2, dp_shard=2, tp=1), 4, MeshLayout(2, 2, 1)),
    (MeshLayout(), 1, MeshLayout(1, 1, 1)),
])
def test_resolve_fills_dp_shard(layout: MeshLayout, world: int, expected: MeshLayout) -> None:
    resolved = layout.resolve(world, arch())
    assert resolved == expected
    assert resolved.world_size == world and resolved.dp == expected.dp_replicate * expected.dp_shard


@pytest.mark.parametrize(("layout", "world", "keys"), [
    (MeshLayout(tp=3), 8, ["parallel.tp", "parallel.dp_replicate", "parallel.dp_shard"]),
    (MeshLayout(dp_shard=2, tp=2), 8, ["parallel.dp_replicate", "parallel.dp_shard", "parallel.tp", "8"]),
    (MeshLayout(tp=0), 4, ["parallel.tp"]),
    (MeshLayout(dp_replicate=0), 4, ["parallel.dp_replicate"]),
    (MeshLayout(dp_shard=0), 4, ["parallel.dp_shard"]),
])
def test_resolve_rejects_degrees_that_do_not_multiply_to_the_world(layout, world, keys) -> None:
    with pytest.raises(ValueError) as err:
        layout.resolve(world, arch())
    for key in keys:
        assert key in str(err.value)


@pytest.mark.parametrize(("model", "what"), [
    (arch(heads=6, kv_heads=2), "query heads"),
    (arch(heads=8, kv_heads=1), "key/value heads"),
    (arch(ffn=90), "FFN width"),
])
def test_resolve_rejects_tp_that_does_not_divide_the_model(model: LlamaArch, what: str) -> None:
    with pytest.raises(ValueError, match=rf"parallel\.tp \(4\) must divide the model's {what}"):
        MeshLayout(tp=4).resolve(8, model)


@pytest.mark.parametrize("routing", ["triton", "auto"])
def test_grouped_gemm_routing_is_refused_under_tp(routing: str) -> None:
    with pytest.raises(ValueError, match=rf"model\.routing: {routing} .*parallel\.tp = 2"):
        check_parallel_support(MeshLayout(1, 2, 2), engine="torch", attention="sdpa", routing=routing)
    # Data parallel alone is fine: FSDP2 gathers a block's weights before the block runs.
    check_parallel_support(MeshLayout(1, 4, 1), engine="torch", attention="sdpa", routing=routing)


@pytest.mark.parametrize("attention", ["sdpa", "flex", "triton", "auto"])
def test_every_attention_backend_runs_on_sharded_heads(attention: str) -> None:
    check_parallel_support(MeshLayout(1, 2, 2), engine="torch", attention=attention, routing="index")


def test_tp_and_hybrid_need_the_torch_engine() -> None:
    for layout in (MeshLayout(1, 2, 2), MeshLayout(2, 2, 1)):
        with pytest.raises(ValueError, match=r"train\.engine: torch"):
            check_parallel_support(layout, engine="deepspeed", attention="sdpa", routing="index")
    check_parallel_support(MeshLayout(1, 4, 1), engine="deepspeed", attention="sdpa", routing="triton")
