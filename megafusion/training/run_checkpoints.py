"""Resumable run checkpoints on top of DeepSpeed's (base-model and exported-model files are `megafusion.checkpoint`).

Layout: <dir>/step-00000100/ (DeepSpeed files for the trainable parameters, optimizer and LR scheduler, plus
rank<r>.pt with that rank's loader state and RNG states, then COMPLETE) and <dir>/latest naming the newest
complete tag. `latest` is replaced atomically only after every rank finished writing and COMPLETE exists, so a
crash during a save leaves the previous checkpoint as the latest. Frozen (text) weights are not stored: the
checkpoint records the base model's path and a hash of its weight files, verified on resume."""

from __future__ import annotations

import hashlib
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megafusion.common.atomic import remove_stale_tmp, write_text_atomic

COMPLETE = "COMPLETE"
LATEST = "latest"


def hash_weights(base: Path) -> str:
    """sha256 over the base checkpoint's weight files (names and bytes), in sorted order."""
    files = [base] if base.is_file() else sorted(
        p for p in base.iterdir() if p.suffix in (".safetensors", ".gguf") or p.name.endswith(".index.json")
    )
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy(), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int, base_ref: dict[str, str], rank: int, world: int):
        self.dir = Path(directory)
        self.keep_last, self.base_ref, self.rank, self.world = keep_last, base_ref, rank, world

    @staticmethod
    def tag(step: int) -> str:
        return f"step-{step:08d}"

    def complete_tags(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir() and (p / COMPLETE).is_file())

    def latest_tag(self) -> str | None:
        latest = self.dir / LATEST
        if latest.is_file():
            tag = latest.read_text().strip()
            if (self.dir / tag / COMPLETE).is_file():
                return tag
        tags = self.complete_tags()
        return tags[-1] if tags else None

    def save(self, engine: Any, step: int, loader: Any, generator: torch.Generator, extra: dict) -> str:
        tag, target = self._begin(step)
        client_state = {"step": step, "base": self.base_ref, "world_size": self.world, **extra}
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
        torch.save({"loader": loader.state_dict(), "rng": rng_state(generator), "step": step},
                   target / f"rank{self.rank}.pt")
        self._finish(tag, step)
        return tag

    def _begin(self, step: int) -> tuple[str, Path]:
        """The tag and directory of a save, emptied of a crashed earlier save of the same step (collective)."""
        tag = self.tag(step)
        target = self.dir / tag
        if self.rank == 0 and target.exists():  # a leftover of a crashed save of this same step
            shutil.rmtree(target)
        _barrier()
        return tag, target

    def _finish(self, tag: str, step: int) -> None:
        """After every rank wrote its files: mark COMPLETE, then move `latest`, then prune (collective)."""
        _barrier()
        if self.rank == 0:
            (self.dir / tag / COMPLETE).write_text(f"{step}\n")
            remove_stale_tmp(self.dir / LATEST)  # left by a run killed while it wrote `latest`
            write_text_atomic(self.dir / LATEST, tag + "\n")
            self._prune(keep=tag)
        _barrier()

    def check_base(self, tag: str, stored: Any) -> None:
        if stored != self.base_ref:
            raise ValueError(
                f"{self.dir / tag}: was trained from base {stored}, but this run's base is "
                f"{self.base_ref}; the frozen weights differ, resuming would not continue the same run"
            )

    def _prune(self, keep: str) -> None:
        complete = self.complete_tags()
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(self.dir / old, ignore_errors=True)
        for p in self.dir.iterdir():  # incomplete saves of earlier crashed runs
            if p.is_dir() and not (p / COMPLETE).exists() and p.name < keep:
                shutil.rmtree(p, ignore_errors=True)

    def load(self, engine: Any, loader: Any, generator: torch.Generator, tag: str | None = None) -> int:
        tag = tag or self.latest_tag()
        if tag is None:
            raise FileNotFoundError(f"{self.dir}: no complete checkpoint")
        _, client = engine.load_checkpoint(str(self.dir), tag=tag, load_module_strict=False)
        if client is None:
            raise RuntimeError(f"{self.dir / tag}: DeepSpeed could not load this checkpoint")
        self.check_base(tag, client.get("base"))
        if client.get("world_size") != self.world:
            raise ValueError(
                f"{self.dir / tag}: written with {client.get('world_size')} ranks, resuming with {self.world}; "
                "the data loader's per-rank state needs the same world size"
            )
        state = torch.load(self.dir / tag / f"rank{self.rank}.pt", weights_only=True)
        loader.load_state_dict(state["loader"])
        restore_rng(state["rng"], generator)
        return int(client["step"])
