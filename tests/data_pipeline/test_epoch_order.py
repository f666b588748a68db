"""The layout-free epoch order, consumed-position record and data fingerprint behind the loader."""

from collections import Counter

from megafusion.data_pipeline.epoch_order import (
    ConsumedPositions,
    EpochOrder,
    data_fingerprint,
    describe_change,
    reader_range,
)

COUNTS = [10, 7, 10, 12]


def _epoch(order: EpochOrder, epoch: int) -> list[tuple[int, int]]:
    return [order.locate(epoch, p)[:2] for p in range(order.num_positions)]


def test_each_epoch_is_a_permutation_shuffled_across_shard_boundaries():
    order = EpochOrder(COUNTS, seed=5, window=16)
    every = [(s, i) for s, n in enumerate(COUNTS) for i in range(n)]
    first, second = _epoch(order, 0), _epoch(order, 1)
    assert sorted(first) == sorted(second) == every
    assert first != second, "epochs must differ"
    # Like a shuffle buffer of 16: every window mixes more than one shard and is not in stored order.
    for w in range(0, order.num_positions - 16, 16):
        window = first[w : w + 16]
        assert len({s for s, _ in window}) > 1 and window != sorted(window)
        # ... and covers exactly the 16 samples of the window of concatenated shards in this epoch's shard order.
        shards = order.shard_order(0)
        flat = [(s, i) for s in shards for i in range(COUNTS[s])]
        assert sorted(window) == sorted(flat[w : w + 16])
    draws = [order.locate(0, p)[2] for p in range(order.num_positions)]
    assert all(0 <= d < 1 for d in draws) and len(set(draws)) == len(draws)


def test_window_one_keeps_the_stored_order_of_each_shard():
    order = EpochOrder(COUNTS, seed=5, window=1)
    flat = [(s, i) for s in order.shard_order(2) for i in range(COUNTS[s])]
    assert _epoch(order, 2) == flat


def test_reader_ranges_tile_the_epoch_for_any_layout():
    for world, workers in ((1, 1), (2, 1), (3, 2), (4, 3)):
        ranges = [reader_range(39, r, world, w, workers) for r in range(world) for w in range(workers)]
        covered = Counter(p for a, b in ranges for p in range(a, b))
        assert covered == Counter(range(39)), (world, workers)


def test_consumed_positions_merge_and_collapse_whole_epochs():
    a = ConsumedPositions(10)
    a.add(0, 0, 4)
    a.add(0, 6, 8)
    a.add(1, 0, 2)
    assert a.next_free(0, 0) == 4 and a.next_free(0, 5) == 5 and a.next_free(0, 6) == 8
    b = ConsumedPositions.from_state(10, {"first_epoch": 0, "intervals": {0: [[3, 6], [8, 10]]}})
    a.merge(b)
    assert a.first_epoch == 1 and a.intervals == {1: [[0, 2]]}
    assert a.next_free(0, 3) == 10 and a.count(0) == 10 and a.count(1) == 2
    assert ConsumedPositions.from_state(10, a.to_state()).to_state() == a.to_state()


def test_fingerprint_names_what_changed(tmp_path):
    shards = [tmp_path / f"shard-{k}.tar" for k in range(3)]
    for k, p in enumerate(shards):
        p.write_bytes(b"x" * (10 + k))
    old = data_fingerprint({"num_shards": 3}, shards)
    assert describe_change(old, data_fingerprint({"num_shards": 3}, shards)) is None
    shards[1].write_bytes(b"x")
    shards[2].unlink()
    new = data_fingerprint({"num_shards": 3, "extra": 1}, shards)
    assert describe_change(old, new) == "shard-1.tar 11 -> 1 bytes, shard-2.tar missing, index.json content differs"
    assert describe_change(old, data_fingerprint({"num_shards": 3}, shards[:1]), limit=1) == (
        "shard-1.tar removed and 1 more")
