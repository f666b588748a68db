"""The torch engine's data: a fixed number of data streams per run, dealt out to the data-parallel ranks.

A run starts with one stream per data-parallel rank (stream s = the loader shard s of S, and the timestep/noise
generator seeded by s). The stream count S is a property of the run, stored in every checkpoint: a run resumed
on a smaller data-parallel degree D (S divisible by D) gives each rank S / D streams, drawn round robin as extra
accumulation micro-batches, so every optimizer step still sees exactly the same global batch and noise as before
the resume. Tensor-parallel ranks of one replica hold the same streams and so draw identical batches and noise.
Each stream's loader state is layout-free (data_pipeline/loader.py): it also resumes on another data.num_workers,
and it refuses changed data.shards unless train.allow_data_change (its DataChangedError names what changed)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from megafusion.training.run_checkpoints import restore_rng, rng_state

STREAM_KEY = "stream"  # the batch entry naming the stream it came from


def seed_of_stream(seed: int, stream: int) -> int:
    """The generator seed of a stream; stream s gets what DeepSpeed's rank s gets (trainer.py), so a one-replica
    torch run draws the same noise as a one-process DeepSpeed run."""
    return seed * 100_003 + stream


def streams_of_rank(num_streams: int, dp_rank: int, dp_size: int) -> list[int]:
    """The streams a data-parallel rank draws from (contiguous blocks). Raises naming the keys when S is not a
    multiple of the data-parallel degree."""
    if num_streams % dp_size:
        raise ValueError(
            f"the run's checkpoint has {num_streams} data streams (its data-parallel degree when it started), which "
            f"the data-parallel degree {dp_size} (parallel.dp_replicate x parallel.dp_shard) does not divide: the "
            f"data order cannot be continued. Resume with a data-parallel degree dividing {num_streams}, or start "
            "a new train.output_dir"
        )
    per_rank = num_streams // dp_size
    return list(range(dp_rank * per_rank, (dp_rank + 1) * per_rank))


class DataStreams:
    """This rank's streams: iterating yields their batches round robin, each tagged with STREAM_KEY; `generator`
    gives the stream's noise generator. state_dict() is per stream, so it can be dealt out differently later."""

    def __init__(self, ids: list[int], loaders: list[StatefulDataLoader], generators: list[torch.Generator]) -> None:
        self.ids, self.loaders, self.generators = ids, loaders, generators

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iterators = [iter(loader) for loader in self.loaders]
        while True:
            for stream, it in zip(self.ids, iterators, strict=True):
                batch = next(it)
                batch[STREAM_KEY] = stream
                yield batch

    def generator(self, stream: int) -> torch.Generator:
        return self.generators[self.ids.index(stream)]

    def state_dict(self) -> dict[int, dict[str, Any]]:
        """Per stream: its loader state and RNG states (the global ones are this rank's, restored only from its
        first stream)."""
        return {s: {"loader": loader.state_dict(), "rng": rng_state(g)}
                for s, loader, g in zip(self.ids, self.loaders, self.generators, strict=True)}

    def load_state_dict(self, states: dict[int, dict[str, Any]]) -> None:
        for i, (s, loader, g) in enumerate(zip(self.ids, self.loaders, self.generators, strict=True)):
            loader.load_state_dict(states[s]["loader"])
            if i == 0:
                restore_rng(states[s]["rng"], g)
            else:
                g.set_state(states[s]["rng"]["generator"])
