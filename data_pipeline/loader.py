"""The streaming training loader: latent shards -> the epoch's global order -> this reader's range -> packed
sequences.

The order and the consumed record are layout-free (epoch_order.py): an epoch is a seeded permutation of every
sample, each loader worker of each rank reads a contiguous range of it, and the state is the seed and window of
the order, a fingerprint of the shard index, and which positions of which epochs are consumed (a few intervals).
A position is consumed once the sequence holding its document was handed out (or the position was skipped as
unreadable); documents still pending in a packer are not, and are read again after a resume. Because a reader
reads its range in order and everything about a document (its caption-first draw too) depends only on its
position, a resume on the same layout rebuilds the same pending documents and continues bitwise, and a resume on
another number of ranks or workers splits what is left of the epoch among the new readers, so every sample of
the epoch is still used exactly once.

torchdata's StatefulDataLoader collects the per-worker states; ElasticLoader adds the layout and fingerprint,
restores a same-layout state exactly, and merges the workers' records when the worker count changed.
`merge_loader_states` merges the states of all ranks for a resume on another number of ranks."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from megafusion.data_pipeline.epoch_order import (
    ConsumedPositions,
    EpochOrder,
    data_fingerprint,
    describe_change,
    reader_range,
)
from megafusion.data_pipeline.packing import PackedSequence, SequencePacker, collate_packed
from megafusion.data_pipeline.shard_format import LatentRecord, read_index, read_shard, shard_name
from megafusion.data_pipeline.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
# torchdata 0.11 calls a deprecated torch hook each time a loader starts; there is nothing for a user to act on.
warnings.filterwarnings("ignore", message=".set_vital. is deprecated")

STATE_FORMAT = "megafusion.loader/2"
LAYOUT_KEY = "megafusion_layout"  # ElasticLoader's entry in a StatefulDataLoader state


class DataChangedError(ValueError):
    """A resume found other data (or another order) than the checkpoint was written with."""


@dataclass
class LoaderSettings:
    """How the stream packs and orders documents (the run config's `data` section fills it; defaults as there)."""

    max_len: int = 4096  # tokens per packed sequence
    caption_first_prob: float = 0.8  # share of documents with the caption before the image
    # A two-stage curriculum: from `caption_first_late_epoch` epochs of data on (a reader's progress through its
    # share, so fractions of an epoch work on large data), documents are caption-first at this share instead.
    # Keyed on data position, not step, so a document's layout stays a function of its position (exact resumes,
    # any world size or engine). None = one share throughout.
    caption_first_prob_late: float | None = None
    caption_first_late_epoch: float = 0.0
    # Share of caption-first documents whose caption is dropped ("BOI image EOI EOS", every timestep): the
    # unconditional prediction classifier-free guidance needs (Ho & Salimans 2022). 0 leaves image-first
    # documents as the only caption-less images, and those only see t <= image_first_max_timestep.
    caption_dropout_prob: float = 0.0
    shuffle_buffer: int = 1000  # the window of the epoch's order that is permuted (epoch_order.py)
    seed: int = 0
    num_workers: int = 2  # DataLoader worker processes per rank
    # With fewer shards than ranks x workers: False stops with an error, True lets readers share shards (each
    # still reads only its own samples, so an epoch stays exactly-once; shards are read several times).
    resample_shards: bool = False

    def __post_init__(self) -> None:
        for ok, message in (
            (self.max_len > 1, f"max_len: must be > 1, got {self.max_len}"),
            (0.0 <= self.caption_first_prob <= 1.0,
             f"caption_first_prob: must be in [0, 1], got {self.caption_first_prob}"),
            (self.caption_first_prob_late is None or 0.0 <= self.caption_first_prob_late <= 1.0,
             f"caption_first_prob_late: must be in [0, 1] or null, got {self.caption_first_prob_late}"),
            (self.caption_first_late_epoch >= 0.0,
             f"caption_first_late_epoch: must be >= 0, got {self.caption_first_late_epoch}"),
            (0.0 <= self.caption_dropout_prob < 1.0,
             f"caption_dropout_prob: must be in [0, 1), got {self.caption_dropout_prob}"),
            (self.shuffle_buffer >= 1, f"shuffle_buffer: must be >= 1, got {self.shuffle_buffer}"),
            (self.num_workers >= 0, f"num_workers: must be >= 0, got {self.num_workers}"),
        ):
            if not ok:
                raise ValueError(message)

    def caption_first_prob_at(self, epochs: float) -> float:
        """The caption-first share after `epochs` epochs of a reader's data."""
        late = self.caption_first_prob_late
        return self.caption_first_prob if late is None or epochs < self.caption_first_late_epoch else late


class LatentSequenceStream(IterableDataset):
    """Infinite stream of packed sequences for one rank; DataLoader workers split this rank's range."""

    def __init__(
        self,
        shard_dir: str | Path,
        tokenizer: str | Path,
        tokens_per_image: int,
        boi_id: int,
        eoi_id: int,
        cfg: LoaderSettings,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.shard_dir = Path(shard_dir)
        index = read_index(self.shard_dir)
        self.shards = [self.shard_dir / shard_name(i) for i in range(int(index["num_shards"]))]
        self.latent_shape = tuple(index["latent_shape"])
        if len(index.get("counts", [])) != len(self.shards):
            raise ValueError(f"{self.shard_dir}/index.json: needs `counts` (samples per shard) for all "
                             f"{len(self.shards)} shards; rerun `megafusion precompute-latents`")
        self.order = EpochOrder([int(c) for c in index["counts"]], cfg.seed, cfg.shuffle_buffer)
        self.fingerprint = data_fingerprint(index, self.shards)
        self.tokenizer_path, self.cfg = str(tokenizer), cfg
        self.tokens_per_image, self.boi_id, self.eoi_id = tokens_per_image, boi_id, eoi_id
        self.rank, self.world_size = rank, world_size
        readers = world_size * max(1, cfg.num_workers)
        if len(self.shards) < readers and not cfg.resample_shards:
            raise ValueError(
                f"{self.shard_dir}: {len(self.shards)} shards for {world_size} ranks x {max(1, cfg.num_workers)} "
                f"workers = {readers} readers; write more shards (smaller --shard-size), use fewer workers, or "
                "set data.resample_shards=true"
            )
        if self.order.num_positions < readers:
            raise ValueError(f"{self.shard_dir}: {self.order.num_positions} samples for {readers} readers")
        self._state: dict | None = None
        self._worker: _WorkerStream | None = None

    def _worker_stream(self) -> _WorkerStream:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = _WorkerStream(self, worker, num_workers)
        if self._state is not None:
            stream.load_state_dict(self._state)
        return stream

    def __iter__(self) -> Iterator[PackedSequence]:
        self._worker = self._worker_stream()
        return iter(self._worker)

    # torchdata calls these inside each worker (and in-process when num_workers == 0).
    def state_dict(self) -> dict:
        return self._worker.state_dict() if self._worker is not None else (self._state or {})

    def load_state_dict(self, state: dict) -> None:
        self._state = state or None


@dataclass
class _ShardSamples:
    """One shard read whole: sample i is records[i] (None if it was a bad sample); from `lost` on (when the tar
    is damaged) nothing was readable."""

    records: list[LatentRecord | None]
    lost: int | None


class _WorkerStream:
    def __init__(self, ds: LatentSequenceStream, worker: int, num_workers: int) -> None:
        self.ds, self.order = ds, ds.order
        self.worker, self.stream_id = worker, ds.rank * num_workers + worker
        self.num_streams = ds.world_size * num_workers
        self.start, self.end = reader_range(self.order.num_positions, ds.rank, ds.world_size, worker, num_workers)
        self.consumed = ConsumedPositions(self.order.num_positions)
        # Data health, cumulative and committed with the consumed positions: samples not used (bad, wrong shape,
        # or lost behind damage in their shard) and damaged shards (once per epoch each).
        self.samples_skipped = self.shards_damaged = 0
        # Skips read but not yet committed: (epoch, position, samples, shards).
        self._events: list[tuple[int, int, int, int]] = []
        self._commit: tuple[int, int] | None = None  # the first position read but not consumed yet
        self._cache: dict[int, _ShardSamples] = {}
        self._cache_window: tuple[int, int] | None = None
        tok = load_tokenizer(ds.tokenizer_path)
        self.tokenizer = tok
        pad = tok.eos_id if tok.eos_id is not None else 0
        self.packer = SequencePacker(ds.cfg.max_len, ds.tokens_per_image, ds.boi_id, ds.eoi_id, tok.prefix_ids,
                                     tok.eos_id, pad)

    # ---------------------------------------------------------------- reading
    def _positions(self) -> Iterator[tuple[int, int]]:
        """This reader's unconsumed positions, epoch after epoch."""
        epoch = self.consumed.first_epoch
        while True:
            pos = self.start
            while (pos := self.consumed.next_free(epoch, pos)) < self.end:
                yield epoch, pos
                pos += 1
            epoch += 1

    def _read_shard(self, shard: int) -> _ShardSamples:
        path = self.ds.shards[shard]
        records: list[LatentRecord | None] = []
        damaged = False

        def on_skip(key: str, reason: str) -> None:
            nonlocal damaged
            log.warning("skipped %s: %s", key, reason)
            if reason.startswith("unreadable tar"):
                damaged = True
            else:  # a bad sample holds its place in the shard
                records.append(None)

        for record in read_shard(path, on_skip):
            records.append(record)
        # Samples come in stored order (a sample cut by the damage may still arrive, as bad): all after them are lost.
        return _ShardSamples(records, len(records) if damaged else None)

    def _sample(self, epoch: int, pos: int) -> tuple[LatentRecord | None, float, int, int]:
        """The record at a position (None if unusable), its caption-first draw, and the samples and shards it
        counts as skipped and damaged."""
        shard, i, draw = self.order.locate(epoch, pos)
        window = (epoch, pos // self.order.window)
        if self._cache_window != window:  # keep only the shards this window still needs
            keep = self.order.window_shards(epoch, pos)
            self._cache = {s: v for s, v in self._cache.items() if s in keep}
            self._cache_window = window
        if shard not in self._cache:
            self._cache[shard] = self._read_shard(shard)
        samples = self._cache[shard]
        # A damaged shard counts once per epoch, at its first lost sample (its last one if none was lost).
        damaged = int(samples.lost is not None and i == min(samples.lost, self.order.counts[shard] - 1))
        record = samples.records[i] if i < len(samples.records) else None
        if record is None:
            return None, draw, 1, damaged
        if tuple(record.latent.shape) != self.ds.latent_shape:
            log.warning("skipped %s: latent shape %s != index %s", record.key, tuple(record.latent.shape),
                        self.ds.latent_shape)
            return None, draw, 1, damaged
        return record, draw, 0, damaged

    def __iter__(self) -> Iterator[PackedSequence]:
        if self.start == self.end:
            raise RuntimeError(f"{self.ds.shard_dir}: reader {self.stream_id} has no sample to read")
        epoch_seen, read, delivered = None, 0, 0
        for epoch, pos in self._positions():
            if epoch != epoch_seen:
                if read == self.end - self.start and delivered == 0:
                    raise RuntimeError(f"{self.ds.shard_dir}: reader {self.stream_id} got no readable sample from "
                                       f"its positions [{self.start}, {self.end}) in a whole epoch")
                epoch_seen, read, delivered = epoch, 0, 0
            read += 1
            if self._commit is None:
                self._commit = (epoch, pos)
            record, draw, skipped, damaged = self._sample(epoch, pos)
            if skipped or damaged:
                self._events.append((epoch, pos, skipped, damaged))
            if record is None:
                continue
            delivered += 1
            cfg = self.ds.cfg
            caption_first = cfg.caption_first_prob_at(epoch + (pos - self.start) / (self.end - self.start))
            image_first = draw >= caption_first
            # The same draw decides the dropout (its lowest share), so a document's layout stays a function of
            # its position alone and resumes stay exact.
            dropped = draw < caption_first * cfg.caption_dropout_prob
            caption = [] if dropped else self.tokenizer.encode(record.caption)
            doc = self.packer.document(record.key, caption, record.latent, image_first)
            done = self.packer.add(doc)
            if done is not None:
                # Everything read before this document is in `done` or was skipped; this one stays pending.
                self._commit_until(epoch, pos)
                done.reader_health = (self.stream_id, self.samples_skipped, self.shards_damaged)
                yield done

    def _commit_until(self, epoch: int, pos: int) -> None:
        assert self._commit is not None
        first_epoch, first_pos = self._commit
        for e in range(first_epoch, epoch + 1):
            self.consumed.add(e, first_pos if e == first_epoch else self.start, pos if e == epoch else self.end)
        keep = []
        for event in self._events:
            if event[:2] < (epoch, pos):
                self.samples_skipped += event[2]
                self.shards_damaged += event[3]
            else:
                keep.append(event)
        self._events, self._commit = keep, (epoch, pos)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "reader": [self.stream_id, self.num_streams],
            "order": self.order.key(),
            "consumed": self.consumed.to_state(),
            "samples_skipped": self.samples_skipped,
            "shards_damaged": self.shards_damaged,
        }

    def load_state_dict(self, state: dict) -> None:
        self.consumed = ConsumedPositions.from_state(self.order.num_positions, state["consumed"])
        # A merged state (reader None) carries the totals of all old readers: the first new reader takes them.
        if state["reader"] == [self.stream_id, self.num_streams] or (state["reader"] is None and self.worker == 0):
            self.samples_skipped = int(state["samples_skipped"])
            self.shards_damaged = int(state["shards_damaged"])


# -------------------------------------------------------------------- states of whole loaders
def _worker_states(state: dict) -> list[dict]:
    """The per-reader states inside a loader state (merged states are returned as they are)."""
    if state.get("format") == STATE_FORMAT:
        return [state]
    if "_snapshot" in state:
        snapshots = state["_snapshot"]["_worker_snapshots"].values()
        found = [s.get("dataset_state") for s in snapshots]
    else:
        found = [state.get("dataset_state")]
    return [s for s in found if s and s.get("format") == STATE_FORMAT]


def merge_loader_states(states: list[dict]) -> dict:
    """One layout-free state from the loader states of every rank of a run (or every stream of the torch
    engine): the union of their consumed positions, the sums of their health counts."""
    meta = [s[LAYOUT_KEY] for s in states if LAYOUT_KEY in s]
    readers = [r for s in states for r in _worker_states(s)]
    if not readers:
        raise ValueError("no loader state to merge (written by an older megafusion?)")
    orders = {tuple(r["order"]) for r in readers}
    if len(orders) != 1:
        raise ValueError(f"loader states disagree on the data order (seed, window, samples): {sorted(orders)}")
    num_positions = readers[0]["order"][2]
    consumed = ConsumedPositions(num_positions)
    for r in readers:
        consumed.merge(ConsumedPositions.from_state(num_positions, r["consumed"]))
    merged = {"format": STATE_FORMAT, "reader": None, "order": readers[0]["order"], "consumed": consumed.to_state(),
              "samples_skipped": sum(int(r["samples_skipped"]) for r in readers),
              "shards_damaged": sum(int(r["shards_damaged"]) for r in readers)}
    if meta:
        merged[LAYOUT_KEY] = {"fingerprint": meta[0]["fingerprint"], "layout": None}
    return merged


class ElasticLoader(StatefulDataLoader):
    """A StatefulDataLoader over a LatentSequenceStream whose state also names its layout and data fingerprint.
    load_state_dict takes its own state (restored exactly on the same layout, merged when the worker count
    changed) or a `merge_loader_states` result; it refuses changed data unless `allow_data_change`."""

    dataset: LatentSequenceStream

    def __init__(self, stream: LatentSequenceStream, *, allow_data_change: bool = False, **kwargs: Any) -> None:
        super().__init__(stream, **kwargs)
        self.allow_data_change = allow_data_change

    def _layout(self) -> list[int]:
        return [self.dataset.rank, self.dataset.world_size, max(1, self.num_workers)]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[LAYOUT_KEY] = {"fingerprint": self.dataset.fingerprint, "layout": self._layout()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        meta = state.pop(LAYOUT_KEY, None)
        readers = _worker_states(state)
        if meta is None:
            raise ValueError("the checkpoint's loader state has no layout-free record (written by an older "
                             "megafusion); resume it with that version or start a new train.output_dir")
        if not readers:  # saved before any reader started: nothing consumed
            self._load_merged({})
            return
        if state.get("format") == STATE_FORMAT:  # merge_loader_states over all ranks: rank 0 carries the totals
            merged = state if self.dataset.rank == 0 else {**state, "samples_skipped": 0, "shards_damaged": 0}
        elif meta["layout"] == self._layout():
            merged = None
        elif meta["layout"][:2] != self._layout()[:2]:
            raise ValueError(f"the loader state of rank {meta['layout'][0]} of {meta['layout'][1]} cannot restore "
                             f"rank {self.dataset.rank} of {self.dataset.world_size}: merge every rank's state "
                             "(merge_loader_states)")
        else:  # only the worker count changed: this rank's range is the same, its readers' records cover it
            merged = merge_loader_states([state])
        change = self._data_change(meta["fingerprint"], readers[0]["order"])
        if change is not None:
            where = f"data.shards {self.dataset.shard_dir}"
            if not self.allow_data_change:
                raise DataChangedError(
                    f"{where}: changed since the checkpoint ({change}); resuming would not see every sample of the "
                    "epoch exactly once. Restore the data, or pass --train.allow_data_change=true to continue on it")
            merged = merged or merge_loader_states([state])
            epoch = merged["consumed"]["first_epoch"]
            log.warning("%s: changed since the checkpoint (%s); train.allow_data_change: its order restarts at "
                        "epoch %d", where, change, epoch)
            merged = {**merged, "order": self.dataset.order.key(), "consumed": {"first_epoch": epoch, "intervals": {}}}
        if merged is None:
            super().load_state_dict(state)
        else:
            self._load_merged(merged)

    def _load_merged(self, merged: dict[str, Any]) -> None:
        """Starts every reader of this loader from a layout-free state (applied when iteration begins)."""
        super().load_state_dict({})
        self.next_iter_state = None
        self.dataset.load_state_dict({k: v for k, v in merged.items() if k != LAYOUT_KEY})

    def _data_change(self, fingerprint: dict[str, Any], order: list[int]) -> str | None:
        change = describe_change(fingerprint, self.dataset.fingerprint)
        seed, window, _ = order
        cfg = self.dataset.cfg
        moved = [f"data.seed {seed} -> {cfg.seed}"] * (seed != cfg.seed)
        moved += [f"data.shuffle_buffer {window} -> {cfg.shuffle_buffer}"] * (window != max(1, cfg.shuffle_buffer))
        parts = ([change] if change else []) + moved
        return ", ".join(parts) if parts else None


def build_loader(
    stream: LatentSequenceStream, batch_size: int, num_workers: int | None = None, allow_data_change: bool = False
) -> ElasticLoader:
    """Batches of `batch_size` packed sequences per rank; `loader.state_dict()` goes into the checkpoint."""
    workers = stream.cfg.num_workers if num_workers is None else num_workers
    return ElasticLoader(
        stream,
        allow_data_change=allow_data_change,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_packed,
        persistent_workers=False,
        multiprocessing_context="fork" if workers else None,
    )
