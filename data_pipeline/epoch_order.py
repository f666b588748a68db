"""The layout-free data order behind the training loader (loader.py): which sample comes at each position of an
epoch, which positions are consumed, and a fingerprint of the dataset that a resume checks.

Global order of epoch e, a pure function of (seed, e, the index's per-shard counts, the window): the shards in a
seeded random order, their samples concatenated in stored order, then every aligned window of `window`
consecutive positions (data.shuffle_buffer) permuted at random. Each output is drawn uniformly from a window of
`window` samples that spans shard boundaries, like a shuffle buffer of that size but without its bias to emit early
arrivals early; window 1 keeps the stored order.

Readers split each epoch into contiguous ranges: data-parallel rank r of R gets [r N / R, (r + 1) N / R), and its
loader worker w of W the w-th of W equal parts of that. A reader walks its range in order and skips consumed
positions, so what one reader has consumed is always a prefix of its range, and the consumed set of the whole run
is a handful of intervals per epoch, whatever the layout that consumed them."""

from __future__ import annotations

import bisect
import hashlib
import json
import random
from pathlib import Path
from typing import Any


def reader_range(num_positions: int, rank: int, world: int, worker: int, workers: int) -> tuple[int, int]:
    """The positions [start, end) of an epoch that loader worker `worker` of `workers` on rank `rank` of `world`
    reads."""
    lo, hi = rank * num_positions // world, (rank + 1) * num_positions // world
    span = hi - lo
    return lo + worker * span // workers, lo + (worker + 1) * span // workers


class EpochOrder:
    """Position -> (shard, sample in shard, a uniform draw for that position) for every epoch."""

    def __init__(self, counts: list[int], seed: int, window: int) -> None:
        self.counts, self.seed, self.window = list(counts), seed, max(1, window)
        self.num_positions = sum(self.counts)
        self._epoch: int | None = None
        self._shards: list[int] = []
        self._starts: list[int] = []
        self._window_key: tuple[int, int] | None = None
        self._perm: list[int] = []
        self._draws: list[float] = []

    def key(self) -> list[int]:
        """What the order depends on besides the data: stored with the consumed positions."""
        return [self.seed, self.window, self.num_positions]

    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.counts)))
        random.Random(f"{self.seed}-epoch-{epoch}").shuffle(order)
        return order

    def _set_epoch(self, epoch: int) -> None:
        if self._epoch != epoch:
            self._epoch, self._shards = epoch, self.shard_order(epoch)
            self._starts, total = [], 0
            for s in self._shards:
                self._starts.append(total)
                total += self.counts[s]

    def _set_window(self, epoch: int, w: int) -> None:
        if self._window_key != (epoch, w):
            size = min(self.window, self.num_positions - w * self.window)
            rng = random.Random(f"{self.seed}-epoch-{epoch}-window-{w}")
            self._perm = list(range(size))
            if size > 1:
                rng.shuffle(self._perm)
            self._draws = [rng.random() for _ in range(size)]
            self._window_key = (epoch, w)

    def locate(self, epoch: int, pos: int) -> tuple[int, int, float]:
        self._set_epoch(epoch)
        w, j = divmod(pos, self.window)
        self._set_window(epoch, w)
        q = w * self.window + self._perm[j]
        k = bisect.bisect_right(self._starts, q) - 1
        return self._shards[k], q - self._starts[k], self._draws[j]

    def window_shards(self, epoch: int, pos: int) -> set[int]:
        """The shards holding the samples of the window that `pos` falls in."""
        self._set_epoch(epoch)
        lo = pos // self.window * self.window
        hi = min(self.num_positions, lo + self.window)
        first = bisect.bisect_right(self._starts, lo) - 1
        last = bisect.bisect_right(self._starts, hi - 1) - 1
        return set(self._shards[first : last + 1])


class ConsumedPositions:
    """Consumed positions: every position of the epochs before `first_epoch`, and for later epochs sorted disjoint
    [start, end) intervals."""

    def __init__(self, num_positions: int, first_epoch: int = 0, intervals: dict[int, list[list[int]]] | None = None):
        self.num_positions, self.first_epoch = num_positions, first_epoch
        self.intervals: dict[int, list[list[int]]] = {}
        for epoch, spans in (intervals or {}).items():
            for a, b in spans:
                self.add(int(epoch), a, b)

    def add(self, epoch: int, start: int, end: int) -> None:
        if epoch < self.first_epoch or start >= end:
            return
        spans = self.intervals.setdefault(epoch, [])
        spans.append([start, end])
        spans.sort()
        merged = [spans[0]]
        for a, b in spans[1:]:
            if a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.intervals[epoch] = merged
        # Whole epochs at the front collapse into first_epoch, so the record stays a few intervals long.
        while self.intervals.get(self.first_epoch) == [[0, self.num_positions]]:
            del self.intervals[self.first_epoch]
            self.first_epoch += 1

    def next_free(self, epoch: int, pos: int) -> int:
        """The first unconsumed position >= pos of `epoch` (num_positions if none)."""
        if epoch < self.first_epoch:
            return self.num_positions
        for a, b in self.intervals.get(epoch, []):
            if a <= pos < b:
                return b
            if a > pos:
                break
        return pos

    def count(self, epoch: int) -> int:
        if epoch < self.first_epoch:
            return self.num_positions
        return sum(b - a for a, b in self.intervals.get(epoch, []))

    def merge(self, other: ConsumedPositions) -> None:
        self.first_epoch = max(self.first_epoch, other.first_epoch)
        self.intervals = {e: s for e, s in self.intervals.items() if e >= self.first_epoch}
        for epoch, spans in other.intervals.items():
            for a, b in spans:
                self.add(epoch, a, b)

    def to_state(self) -> dict[str, Any]:
        return {"first_epoch": self.first_epoch,
                "intervals": {int(e): [list(s) for s in spans] for e, spans in self.intervals.items()}}

    @classmethod
    def from_state(cls, num_positions: int, state: dict[str, Any]) -> ConsumedPositions:
        return cls(num_positions, int(state["first_epoch"]), state["intervals"])


def data_fingerprint(index: dict, shards: list[Path]) -> dict[str, Any]:
    """What a resume compares: the index's content and every shard's name and size in bytes (-1 when missing)."""
    canonical = json.dumps(index, sort_keys=True).encode()
    return {"index_sha256": hashlib.sha256(canonical).hexdigest(),
            "shards": [[p.name, p.stat().st_size if p.is_file() else -1] for p in shards]}


def describe_change(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> str | None:
    """One line naming what differs between two fingerprints (None when they are equal)."""
    old_shards, new_shards = dict(map(tuple, old["shards"])), dict(map(tuple, new["shards"]))
    changes = [f"{name} removed" for name in old_shards if name not in new_shards]
    changes += [f"{name} added" for name in new_shards if name not in old_shards]
    changes += [f"{name} missing" if new_shards[name] < 0 else f"{name} {size} -> {new_shards[name]} bytes"
                for name, size in old_shards.items() if name in new_shards and new_shards[name] != size]
    if old["index_sha256"] != new["index_sha256"]:
        changes.append("index.json content differs")
    if not changes:
        return None
    more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
    return ", ".join(changes[:limit]) + more
