"""The torch engine's single-process pieces: data streams, the freeze helper, config refusals."""

from __future__ import annotations

import pytest
import torch

from megafusion.config import load_config
from megafusion.model import LlamaFusion
from megafusion.model.arch import LlamaArch
from megafusion.training.data_streams import STREAM_KEY, DataStreams, seed_of_stream, streams_of_rank
from megafusion.training.optim import build_optimizer, freeze_zero_lr_groups
from megafusion.training.run_setup import prepare_run
from tests.helpers import TINY_IMAGE, TINY_UNET, tiny_llama_config


def tiny_fusion() -> LlamaFusion:
    arch = LlamaArch.from_hf_config(tiny_llama_config().to_dict())
    return LlamaFusion(arch, "deep", TINY_IMAGE, TINY_UNET)


class FakeLoader:
    """A StatefulDataLoader stand-in: batches {"i": k} and its position as state."""

    def __init__(self, name: str) -> None:
        self.name, self.pos = name, 0

    def __iter__(self):
        while True:
            self.pos += 1
            yield {"i": f"{self.name}{self.pos}"}

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def test_streams_are_dealt_in_contiguous_blocks_and_a_non_divisor_is_refused():
    assert [streams_of_rank(4, r, 2) for r in range(2)] == [[0, 1], [2, 3]]
    assert streams_of_rank(2, 0, 1) == [0, 1]
    with pytest.raises(ValueError, match=r"3 data streams.*parallel.dp_replicate x parallel.dp_shard"):
        streams_of_rank(3, 0, 2)
    assert seed_of_stream(0, 1) == 1 and seed_of_stream(2, 0) == 200_006  # DeepSpeed's per-rank seeds


def test_data_streams_round_robin_and_state_per_stream():
    gens = [torch.Generator().manual_seed(seed_of_stream(0, s)) for s in (2, 3)]
    streams = DataStreams([2, 3], [FakeLoader("a"), FakeLoader("b")], gens)
    it = iter(streams)
    got = [next(it) for _ in range(4)]
    assert [(b["i"], b[STREAM_KEY]) for b in got] == [("a1", 2), ("b1", 3), ("a2", 2), ("b2", 3)]
    assert streams.generator(3) is gens[1]
    state = streams.state_dict()
    assert set(state) == {2, 3} and state[3]["loader"] == {"pos": 2}
    expected = torch.randn(3, generator=gens[1])
    fresh = DataStreams([2, 3], [FakeLoader("a"), FakeLoader("b")],
                        [torch.Generator(), torch.Generator()])
    fresh.load_state_dict(state)
    assert fresh.loaders[1].pos == 2 and torch.equal(torch.randn(3, generator=fresh.generators[1]), expected)


def test_freeze_helper_freezes_what_build_optimizer_freezes():
    cfg = load_config("configs/tiny-cpu.yaml").optim
    a, b = tiny_fusion(), tiny_fusion()
    freeze_zero_lr_groups(a, cfg)
    build_optimizer(b, cfg)
    flags = [p.requires_grad for p in a.parameters()]
    assert flags == [p.requires_grad for p in b.parameters()] and any(flags) and not all(flags)


def test_a_tensor_parallel_layout_needs_the_torch_engine():
    with pytest.raises(ValueError, match=r"parallel.tp \(2\).*train.engine: torch"):
        prepare_run(load_config("configs/tiny-cpu.yaml", ["--parallel.tp=2"]))
