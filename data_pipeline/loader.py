"""The streaming training loader: latent shards -> rank/worker split -> shuffle buffer -> packed sequences.

Exact resume: each worker's position (epoch, shard, sample offset), its RNG, its shuffle buffer and its
packer's pending documents form the worker state, which torchdata's StatefulDataLoader collects from the
workers and restores into them; restoring it continues exactly where an uninterrupted run would be."""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from megafusion.data_pipeline.packing import PackedSequence, SequencePacker, collate_packed
from megafusion.data_pipeline.shard_format import LatentRecord, read_index, read_shard, shard_name
from megafusion.data_pipeline.tokenizer import load_tokenizer

log = logging.getLogger(__name__)
# torchdata 0.11 calls a deprecated torch hook each time a loader starts; there is nothing for a user to act on.
warnings.filterwarnings("ignore", message=".set_vital. is deprecated")


@dataclass
class LoaderSettings:
    """How the stream packs and orders documents (the run config's `data` section fills it; defaults as there)."""

    max_len: int = 4096  # tokens per packed sequence
    caption_first_prob: float = 0.8  # share of documents with the caption before the image
    shuffle_buffer: int = 1000
    seed: int = 0
    num_workers: int = 2  # DataLoader worker processes per rank
    # With fewer shards than ranks x workers: False stops with an error, True samples shards with replacement.
    resample_shards: bool = False

    def __post_init__(self) -> None:
        for ok, message in (
            (self.max_len > 1, f"max_len: must be > 1, got {self.max_len}"),
            (0.0 <= self.caption_first_prob <= 1.0,
             f"caption_first_prob: must be in [0, 1], got {self.caption_first_prob}"),
            (self.shuffle_buffer >= 1, f"shuffle_buffer: must be >= 1, got {self.shuffle_buffer}"),
            (self.num_workers >= 0, f"num_workers: must be >= 0, got {self.num_workers}"),
        ):
            if not ok:
                raise ValueError(message)


class LatentSequenceStream(IterableDataset):
    """Infinite stream of packed sequences for one rank; DataLoader workers split this rank's shards."""

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
        # Samples each shard was written with: what a damaged shard's unreadable remainder is counted against.
        self.shard_counts = [int(c) for c in index.get("counts", [])]
        self.tokenizer_path, self.cfg = str(tokenizer), cfg
        self.tokens_per_image, self.boi_id, self.eoi_id = tokens_per_image, boi_id, eoi_id
        self.rank, self.world_size = rank, world_size
        streams = world_size * max(1, cfg.num_workers)
        if len(self.shards) < streams and not cfg.resample_shards:
            raise ValueError(
                f"{self.shard_dir}: {len(self.shards)} shards for {world_size} ranks x {max(1, cfg.num_workers)} "
                f"workers = {streams} readers; write more shards (smaller --shard-size), use fewer workers, or "
                "set data.resample_shards=true"
            )
        self._state: dict | None = None
        self._worker: _WorkerStream | None = None

    def _worker_stream(self) -> _WorkerStream:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = _WorkerStream(self, self.rank * num_workers + worker, self.world_size * num_workers)
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


class _WorkerStream:
    def __init__(self, ds: LatentSequenceStream, stream_id: int, num_streams: int) -> None:
        self.ds, self.stream_id, self.num_streams = ds, stream_id, num_streams
        cfg = ds.cfg
        self.rng = random.Random(f"{cfg.seed}-{stream_id}")
        self.epoch, self.shard_pos, self.sample_pos, self.records_this_epoch = 0, 0, 0, 0
        self.current_shard: int | None = None
        self.buffer: list[LatentRecord] = []
        self.skipped: list[dict] = []
        # Data health, cumulative for this reader and carried in its state: samples not used (bad, or lost behind
        # damage in their shard), shards found damaged (each pass over a damaged shard counts once).
        self.samples_skipped = self.shards_damaged = 0
        self._bad_in_shard = 0
        self._shard_damaged = False
        tok = load_tokenizer(ds.tokenizer_path)
        self.tokenizer = tok
        pad = tok.eos_id if tok.eos_id is not None else 0
        self.packer = SequencePacker(cfg.max_len, ds.tokens_per_image, ds.boi_id, ds.eoi_id, tok.prefix_ids,
                                     tok.eos_id, pad)
        self._records: Iterator[LatentRecord] | None = None

    # ---------------------------------------------------------------- shard order
    def _my_shards(self, epoch: int) -> list[int]:
        order = list(range(len(self.ds.shards)))
        random.Random(f"{self.ds.cfg.seed}-epoch-{epoch}").shuffle(order)
        return order[self.stream_id :: self.num_streams]

    def _skip(self, key: str, reason: str) -> None:
        self.skipped.append({"key": key, "reason": reason})
        log.warning("skipped %s: %s", key, reason)
        if reason.startswith("unreadable tar"):
            self._shard_damaged = True
        elif reason.startswith("bad sample"):
            self._bad_in_shard += 1
        else:
            self.samples_skipped += 1

    def _end_shard(self) -> None:
        """Counts what a finished pass over the current shard did not deliver."""
        self.samples_skipped += self._bad_in_shard
        if self._shard_damaged:
            self.shards_damaged += 1
            counts = self.ds.shard_counts
            if self.current_shard is not None and self.current_shard < len(counts):
                # Everything behind the damage: written samples neither delivered nor already counted as bad.
                self.samples_skipped += max(0, counts[self.current_shard] - self.sample_pos - self._bad_in_shard)
        self._bad_in_shard, self._shard_damaged = 0, False

    def _next_record(self) -> LatentRecord:
        while True:
            if self._records is None:
                if self.ds.cfg.resample_shards:
                    if self.current_shard is None:
                        self.current_shard = self.rng.randrange(len(self.ds.shards))
                else:
                    mine = self._my_shards(self.epoch)
                    if self.shard_pos >= len(mine):
                        if self.records_this_epoch == 0:
                            raise RuntimeError(
                                f"{self.ds.shard_dir}: reader {self.stream_id} got no readable sample from its "
                                f"shards {[self.ds.shards[k].name for k in mine]} in a whole epoch"
                            )
                        self.epoch, self.shard_pos, self.records_this_epoch = self.epoch + 1, 0, 0
                        continue
                    self.current_shard = mine[self.shard_pos]
                records = read_shard(self.ds.shards[self.current_shard], self._skip)
                for _ in range(self.sample_pos):  # resume inside a shard: re-read and drop what was consumed
                    next(records, None)
                self._records = records
            record = next(self._records, None)
            if record is not None:
                self.sample_pos += 1
                self.records_this_epoch += 1
                return record
            self._end_shard()
            self._records, self.sample_pos = None, 0
            self.shard_pos += 1
            if self.ds.cfg.resample_shards:
                self.current_shard = None

    def _next_shuffled(self) -> LatentRecord:
        while len(self.buffer) < self.ds.cfg.shuffle_buffer:
            self.buffer.append(self._next_record())
        i = self.rng.randrange(len(self.buffer))
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

    def __iter__(self) -> Iterator[PackedSequence]:
        expected = self.ds.latent_shape
        while True:
            record = self._next_shuffled()
            if tuple(record.latent.shape) != expected:
                self._skip(record.key, f"latent shape {tuple(record.latent.shape)} != index {expected}")
                continue
            image_first = self.rng.random() >= self.ds.cfg.caption_first_prob
            doc = self.packer.document(record.key, self.tokenizer.encode(record.caption), record.latent, image_first)
            done = self.packer.add(doc)
            if done is not None:
                done.reader_health = (self.stream_id, self.samples_skipped, self.shards_damaged)
                yield done

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "stream_id": self.stream_id,
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "sample_pos": self.sample_pos,
            "records_this_epoch": self.records_this_epoch,
            "current_shard": self.current_shard,
            "rng": _rng_state(self.rng),
            "buffer": [vars(r).copy() for r in self.buffer],
            "packer": self.packer.state_dict(),
            "num_skipped": len(self.skipped),
            "samples_skipped": self.samples_skipped,
            "shards_damaged": self.shards_damaged,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("stream_id") != self.stream_id:
            raise ValueError(
                f"loader state belongs to reader {state.get('stream_id')}, not {self.stream_id}: resume with the "
                "same number of ranks and data.num_workers"
            )
        self.epoch, self.shard_pos, self.sample_pos = state["epoch"], state["shard_pos"], state["sample_pos"]
        self.records_this_epoch = state["records_this_epoch"]
        self.current_shard = state["current_shard"]
        self.rng.setstate(_rng_from_state(state["rng"]))
        self.buffer = [LatentRecord(**r) for r in state["buffer"]]
        self.packer.load_state_dict(state["packer"])
        self.samples_skipped = int(state.get("samples_skipped", 0))
        self.shards_damaged = int(state.get("shards_damaged", 0))
        self._records = None


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _rng_from_state(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


def build_loader(
    stream: LatentSequenceStream, batch_size: int, num_workers: int | None = None
) -> StatefulDataLoader:
    """Batches of `batch_size` packed sequences per rank; `loader.state_dict()` goes into the checkpoint."""
    workers = stream.cfg.num_workers if num_workers is None else num_workers
    return StatefulDataLoader(
        stream,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_packed,
        persistent_workers=False,
        multiprocessing_context="fork" if workers else None,
    )
