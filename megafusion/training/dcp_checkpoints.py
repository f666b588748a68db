"""Run checkpoints of the torch engine, with torch.distributed.checkpoint (DCP), resumable on another layout.

Layout of <dir>/step-N/: DCP's files (`.metadata` + one `__<rank>_0.distcp` per rank) holding "model" (the
trainable parameters only: frozen text weights are never written) and "optim" (AdamW state and param groups, keyed
by parameter name) and, with train.ema_decay > 0, "ema" (the weight average, sharded like the weights), then
`client.pt` (step, base reference, config, layout, stream count, LR scheduler state),
`stream<s>.pt` per data stream (loader + RNG state, data_streams.py), and COMPLETE; `latest` as for DeepSpeed
(run_checkpoints.CheckpointManager: same crash-safe order, same manifest of sizes and sha256 in COMPLETE, same
fallback to the newest intact checkpoint on resume). DCP stores every tensor by its global shape and
reshards on load, so a checkpoint written at dp2 x tp2 loads at tp2 or in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megafusion.training.run_checkpoints import CheckpointManager

CLIENT_FILE = "client.pt"
EMA_KEY = "ema"


def has_ema(path: Path) -> bool:
    """Whether the DCP checkpoint at `path` holds a weight average."""
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return any(k.startswith(EMA_KEY + ".") for k in keys)


def stream_file(stream: int) -> str:
    return f"stream{stream}.pt"


def is_dcp_checkpoint(path: Path) -> bool:
    return (path / CLIENT_FILE).is_file()


class DcpCheckpointManager(CheckpointManager):
    """`engine` is a torch_engine.TorchEngine, `loader` a data_streams.DataStreams (which holds the generators:
    the `generator` argument of save/load is the loop's unused one). writes_streams: whether this rank writes its
    streams' files (tp rank 0 of each replica; the other tp ranks hold the same streams)."""

    def __init__(self, directory: str | Path, keep_last: int, base_ref: dict[str, str], rank: int, world: int,
                 *, writes_streams: bool, client_extra: dict[str, Any]) -> None:
        super().__init__(directory, keep_last, base_ref, rank, world)
        self.writes_streams, self.client_extra = writes_streams, client_extra

    def read_client(self, tag: str) -> dict[str, Any]:
        path = self.dir / tag / CLIENT_FILE
        if not path.is_file():
            raise ValueError(
                f"{self.dir / tag}: not a torch-engine checkpoint (no {CLIENT_FILE}); it was written by "
                "train.engine: deepspeed, resume it with that engine or start a new train.output_dir"
            )
        return torch.load(path, weights_only=True)  # plain data only: nothing in a checkpoint may run code

    def save(self, engine: Any, step: int, loader: Any, generator: torch.Generator, extra: dict) -> str:
        import torch.distributed.checkpoint as dcp

        tag, target = self._begin(step)
        state = engine.state_dict()
        if self.ema is not None:
            state[EMA_KEY] = self.ema.state_dict()
        dcp.save(state, checkpoint_id=str(target))
        if self.writes_streams:
            for stream, state in loader.state_dict().items():
                torch.save(state, target / stream_file(stream))
        if self.rank == 0:
            client = {"step": step, "base": self.base_ref, "world_size": self.world,
                      "scheduler": engine.scheduler.state_dict(), **self.client_extra, **extra}
            torch.save(client, target / CLIENT_FILE)
        self._finish(tag, step)
        return tag

    def load(self, engine: Any, loader: Any, generator: torch.Generator, tag: str | None = None) -> int:
        tag = tag or self.resume_tag()
        if tag is None:
            raise FileNotFoundError(f"{self.dir}: no complete checkpoint")
        with self.reading(tag):
            return self._load_dcp(engine, loader, tag)

    def _load_dcp(self, engine: Any, loader: Any, tag: str) -> int:
        import torch.distributed.checkpoint as dcp

        client = self.read_client(tag)
        self.check_base(tag, client.get("base"))
        state = engine.state_dict()
        restore_ema = self.ema is not None and has_ema(self.dir / tag)
        if restore_ema:
            state[EMA_KEY] = self.ema.state_dict()  # the shadows themselves: DCP loads in place
        dcp.load(state, checkpoint_id=str(self.dir / tag))  # reshards into this layout's DTensors
        engine.load_state_dict(state)
        if self.ema is not None and not restore_ema:
            self.restart_ema(tag)
        engine.scheduler.load_state_dict(client["scheduler"])
        loader.load_state_dict({s: torch.load(self.dir / tag / stream_file(s), weights_only=True)
                                for s in loader.ids})
        return int(client["step"])
