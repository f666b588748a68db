"""Elastic resume of the loader: a state written by one layout (ranks x workers) continues on another and the
epoch still delivers every sample exactly once; a changed dataset is refused unless allowed."""

from collections import Counter

import pytest
import torch

from megafusion.data_pipeline.epoch_order import ConsumedPositions, EpochOrder
from megafusion.data_pipeline.loader import DataChangedError, build_loader, merge_loader_states
from tests.data_pipeline.shard_helpers import make_latent_shards
from tests.data_pipeline.test_loader import _sample_ids, _stream

PER_SHARD = 10
SETTINGS = dict(shuffle_buffer=8, seed=3)


def _loaders(tmp_path, shards, world, workers, state=None):
    loaders = []
    for rank in range(world):
        loader = build_loader(_stream(tmp_path, shards, rank=rank, world=world, num_workers=workers, **SETTINGS),
                              batch_size=2)
        if state is not None:
            loader.load_state_dict(state)
        loaders.append(loader)
    return loaders


def _consumed_ids(merged: dict, epoch: int, counts: list[int]) -> list[int]:
    """The samples at the positions of `epoch` that a merged state counts as consumed."""
    order = EpochOrder(counts, SETTINGS["seed"], SETTINGS["shuffle_buffer"])
    consumed = ConsumedPositions.from_state(order.num_positions, merged["consumed"])
    ids = []
    for pos in range(order.num_positions):
        if consumed.next_free(epoch, pos) != pos:
            shard, i, _ = order.locate(epoch, pos)
            ids.append(shard * PER_SHARD + i)
    return ids


@pytest.mark.parametrize("before, steps, after", [
    ((1, 1), [4], (1, 2)),  # one loader worker -> two
    ((2, 0), [3, 5], (1, 0)),  # two ranks, unevenly far -> one
    ((1, 0), [4], (2, 1)),  # one rank -> two
], ids=["1_worker_to_2", "2_ranks_to_1", "1_rank_to_2"])
def test_resume_on_another_layout_delivers_the_epoch_exactly_once(tmp_path, before, steps, after):
    """Documents handed out before the resume plus those after it, up to the point where the merged state says
    epoch 0 is done, are every sample once, plus exactly the epoch-1 samples the state counts as consumed (readers
    that finished their part of epoch 0 early move on)."""
    shards = make_latent_shards(tmp_path / "s", num_shards=8, per_shard=PER_SHARD)
    counts = [PER_SHARD] * 8
    seen: list[int] = []
    states = []
    for loader, n in zip(_loaders(tmp_path, shards, *before), steps, strict=True):
        it = iter(loader)
        for _ in range(n):
            seen += _sample_ids(next(it))
        states.append(loader.state_dict())
        del it
    assert len(set(seen)) == len(seen), "a sample twice within the first part of epoch 0"
    # One rank (only workers change) restores its own state; a change of ranks restores the union of all ranks.
    state = states[0] if before[0] == after[0] else merge_loader_states(states)
    loaders = _loaders(tmp_path, shards, *after, state=state)
    iters = [iter(loader) for loader in loaders]
    for _ in range(100):
        for it in iters:
            seen += _sample_ids(next(it))
        merged = merge_loader_states([loader.state_dict() for loader in loaders])
        if merged["consumed"]["first_epoch"] >= 1:
            break
    assert merged["consumed"]["first_epoch"] == 1, "epoch 0 not finished after 100 rounds"
    expected = Counter(range(80)) + Counter(_consumed_ids(merged, 1, counts))
    assert Counter(seen) == expected
    missing = sorted(set(range(80)) - set(seen))
    assert not missing, f"samples of epoch 0 never delivered: {missing}"


def test_health_counts_survive_a_merge(tmp_path):
    """A damaged shard's counts, reported per reader, are carried whole into a resume on fewer ranks."""
    shards = make_latent_shards(tmp_path / "s", num_shards=4, per_shard=PER_SHARD, corrupt=(1,))
    totals = []
    states = []
    for rank in range(2):
        loader = build_loader(_stream(tmp_path, shards, rank=rank, world=2, num_workers=0, shuffle_buffer=1),
                              batch_size=1)
        it = iter(loader)
        health = (rank, 0, 0)
        for _ in range(8):  # past each rank's 20 positions: its whole range of epoch 0 (a shard a epoch)
            health = next(it)["reader_health"][-1]
        totals.append(health[1:])
        states.append(loader.state_dict())
        del it
    skipped, damaged = map(sum, zip(*totals, strict=True))
    assert damaged >= 1 and skipped >= damaged
    merged = merge_loader_states(states)
    assert (merged["samples_skipped"], merged["shards_damaged"]) == (skipped, damaged)
    resumed = build_loader(_stream(tmp_path, shards, num_workers=0, shuffle_buffer=1), batch_size=1)
    resumed.load_state_dict(merged)
    reader, now_skipped, now_damaged = next(iter(resumed))["reader_health"][-1]
    assert (now_skipped, now_damaged) >= (skipped, damaged)


def _saved_state(tmp_path, shards, steps=3, **cfg):
    loader = build_loader(_stream(tmp_path, shards, num_workers=0, **{**SETTINGS, **cfg}), batch_size=2)
    it = iter(loader)
    for _ in range(steps):
        next(it)
    return loader.state_dict()


def _cut(shards, name):
    path = shards / name
    path.write_bytes(path.read_bytes()[:2048])


@pytest.mark.parametrize("change, message", [
    (lambda s: _cut(s, "shard-000002.tar"), r"shard-000002\.tar \d+ -> 2048 bytes"),
    (lambda s: (s / "shard-000003.tar").rename(s / "renamed.tar"), r"shard-000003\.tar missing"),
    (lambda s: make_latent_shards(s, num_shards=3, per_shard=PER_SHARD), r"shard-000003\.tar removed"),
    (lambda s: (s / "index.json").write_text((s / "index.json").read_text().replace("}", ', "note": 1}')),
     r"index\.json content differs"),
], ids=["resized", "renamed", "removed", "index"])
def test_changed_data_is_refused_unless_allowed(tmp_path, caplog, change, message):
    shards = make_latent_shards(tmp_path / "s", num_shards=4, per_shard=PER_SHARD)
    state = _saved_state(tmp_path, shards)
    change(shards)
    refused = build_loader(_stream(tmp_path, shards, num_workers=0, **SETTINGS), batch_size=2)
    with pytest.raises(DataChangedError, match=message) as err:
        refused.load_state_dict(state)
    assert "\n" not in str(err.value) and "allow_data_change" in str(err.value)
    allowed = build_loader(_stream(tmp_path, shards, num_workers=0, **SETTINGS), batch_size=2,
                           allow_data_change=True)
    with caplog.at_level("WARNING"):
        allowed.load_state_dict(state)
    assert "restarts at epoch 0" in caplog.text
    assert next(iter(allowed))["latents"].shape[0] > 0


def test_another_order_is_refused(tmp_path):
    shards = make_latent_shards(tmp_path / "s", num_shards=4, per_shard=PER_SHARD)
    state = _saved_state(tmp_path, shards)
    loader = build_loader(_stream(tmp_path, shards, num_workers=0, **{**SETTINGS, "seed": 4}), batch_size=2)
    with pytest.raises(DataChangedError, match="data.seed 3 -> 4"):
        loader.load_state_dict(state)


def test_after_an_elastic_resume_the_new_layout_resumes_exactly(tmp_path):
    shards = make_latent_shards(tmp_path / "s", num_shards=8, per_shard=PER_SHARD)
    states = []
    for loader, n in zip(_loaders(tmp_path, shards, 2, 0), [2, 3], strict=True):
        it = iter(loader)
        for _ in range(n):
            next(it)
        states.append(loader.state_dict())
        del it
    merged = merge_loader_states(states)
    (full,) = _loaders(tmp_path, shards, 1, 2, state=merged)
    it = iter(full)
    expected = [next(it) for _ in range(10)]
    del it
    (first,) = _loaders(tmp_path, shards, 1, 2, state=merged)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = first.state_dict()
    del it
    (resumed,) = _loaders(tmp_path, shards, 1, 2, state=state)
    it = iter(resumed)
    for want in expected[4:]:
        got = next(it)
        assert got["keys"] == want["keys"]
        assert all(torch.equal(got[k], want[k]) for k in ("input_ids", "labels", "latents", "image_first"))
