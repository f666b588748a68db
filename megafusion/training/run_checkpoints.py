"""Resumable run checkpoints on top of DeepSpeed's (base-model and exported-model files are `megafusion.checkpoint`).

Layout: <dir>/step-00000100/ (DeepSpeed files for the trainable parameters, optimizer and LR scheduler, plus
rank<r>.pt with that rank's loader state and RNG states, ema.safetensors with the weight average when
train.ema_decay > 0, then COMPLETE) and <dir>/latest naming the newest
complete tag. `latest` is replaced atomically only after every rank finished writing and COMPLETE exists, so a
crash during a save leaves the previous checkpoint as the latest. COMPLETE is a manifest of every file with its
size and sha256 (checkpoint_manifest.py); a resume checks it and falls back to the newest intact checkpoint.
Frozen (text) weights are not stored: the checkpoint records the base model's path and a hash of its weight
files, verified on resume."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megafusion.common.atomic import remove_stale_tmp, write_text_atomic
from megafusion.training import checkpoint_manifest as manifest
from megafusion.training.checkpoint_manifest import INTACT, MARKER, Verdict
from megafusion.training.ema import WeightEMA

log = logging.getLogger(__name__)

COMPLETE = MARKER
LATEST = "latest"
EMA_FILE = "ema.safetensors"
_TAG = re.compile(r"step-\d+")


class CheckpointError(ValueError):
    """No checkpoint of a run can be resumed (the command line turns it into one line and exit code 2)."""


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


def _collective() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reporting_rank() -> bool:
    # The torch engine picks its checkpoint before the process group exists: fall back to the launcher's RANK.
    return (dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))) == 0


_reported: set[str] = set()


def _report(message: str) -> None:
    """Logs once per process (the torch engine looks for its checkpoint twice) and on one rank."""
    if message not in _reported and _reporting_rank():
        _reported.add(message)
        log.warning("%s", message)


def _file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Manifest records of every file of a checkpoint; with several ranks each hashes a share (collective)."""
    if not _collective():
        return manifest.file_records(directory, manifest.checkpoint_files(directory))
    rank, world = dist.get_rank(), dist.get_world_size()
    names = [manifest.checkpoint_files(directory) if rank == 0 else None]
    dist.broadcast_object_list(names, src=0)  # one listing, so every file is hashed exactly once
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, manifest.file_records(directory, names[0][rank::world]))
    return {name: record for share in shares for name, record in share.items()}


def _verify(directory: Path) -> Verdict:
    """verify() of a checkpoint; with several ranks each checks a share of its files and all get the same verdict
    (collective: every rank calls it for the same directories in the same order)."""
    if not _collective():
        return manifest.verify(directory)
    rank, world = dist.get_rank(), dist.get_world_size()
    verdicts: list[Any] = [None] * world
    dist.all_gather_object(verdicts, manifest.verify(directory, share=(rank, world)))
    return next((v for v in verdicts if not v.loadable), verdicts[0])


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int, base_ref: dict[str, str], rank: int, world: int):
        self.dir = Path(directory)
        self.keep_last, self.base_ref, self.rank, self.world = keep_last, base_ref, rank, world
        self.verdicts: dict[str, Verdict] = {}  # what this process found out about a tag (resume checks, saves)
        self.ema: WeightEMA | None = None  # saved and restored with the run when set (track_ema)

    def track_ema(self, ema: WeightEMA | None) -> None:
        self.ema = ema

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

    def step_tags(self) -> list[str]:
        """Every checkpoint directory, complete or not, oldest first."""
        if not self.dir.is_dir():
            return []
        tags = [p.name for p in self.dir.iterdir() if p.is_dir() and _TAG.fullmatch(p.name)]
        return sorted(tags, key=lambda t: int(t.removeprefix("step-")))

    def resume_order(self) -> tuple[list[str], list[str]]:
        """(candidates newest first, ignored newer tags). Candidates start at `latest` when it names a checkpoint
        directory: a complete one beyond it is a leftover of an earlier run that was restarted with
        train.resume=false, or was marked complete just before a crash moved `latest` (resuming one step
        earlier is as exact)."""
        tags = self.step_tags()
        latest = self.dir / LATEST
        named = latest.read_text().strip() if latest.is_file() else None
        if named not in tags:
            return tags[::-1], []
        cut = tags.index(named) + 1
        return tags[:cut][::-1], tags[cut:]

    def survey(self) -> tuple[list[tuple[str, Verdict]], str | None]:
        """Every checkpoint directory with its verdict (oldest first, checked in this process) and the tag a
        resume would pick (None: no checkpoint can be resumed)."""
        verdicts = {tag: manifest.verify(self.dir / tag) for tag in self.step_tags()}
        candidates, _ = self.resume_order()
        return list(verdicts.items()), next((t for t in candidates if verdicts[t].loadable), None)

    def resume_tag(self) -> str | None:
        """The checkpoint to resume: the newest intact one (or unverified, if written before manifests), checked
        file by file against its manifest; each damaged or incomplete newer one is reported in one line. None
        when there is no checkpoint; CheckpointError when there are some but none can be resumed. Collective."""
        order = [self.resume_order()]
        if _collective():  # the verification below is collective: every rank must walk the same tags
            dist.broadcast_object_list(order, src=0)
        candidates, newer = order[0]
        for tag in newer:
            if not (self.dir / tag / COMPLETE).exists():
                _report(f"{self.dir / tag}: incomplete (no {COMPLETE} marker: its save did not finish); skipped")
        if not candidates:
            return None
        skipped = []
        for tag in candidates:
            verdict = self.verdicts[tag] = _verify(self.dir / tag)
            if verdict.loadable:
                if verdict.state != INTACT:
                    _report(f"{self.dir / tag}: {verdict.describe()}; loading it without checks")
                elif skipped:
                    _report(f"{self.dir / tag}: intact; resuming from it, the newest intact checkpoint")
                return tag
            skipped.append(f"{tag}: {verdict.state}")
            _report(f"{self.dir / tag}: {verdict.describe()}; skipped")
        raise CheckpointError(
            f"{self.dir}: no checkpoint can be resumed ({', '.join(skipped)}; the lines above name the files); "
            "move them away or set --train.resume=false to start over"
        )

    def save(self, engine: Any, step: int, loader: Any, generator: torch.Generator, extra: dict) -> str:
        tag, target = self._begin(step)
        client_state = {"step": step, "base": self.base_ref, "world_size": self.world, **extra}
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=True)
        torch.save({"loader": loader.state_dict(), "rng": rng_state(generator), "step": step},
                   target / f"rank{self.rank}.pt")
        if self.ema is not None and self.rank == 0:  # ZeRO 0-2: every rank holds the same full weights
            from safetensors.torch import save_file

            save_file(self.ema.state_dict(), str(target / EMA_FILE))
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
        """After every rank wrote its files: hash them all, write the manifest as COMPLETE, then move `latest`,
        then prune (collective)."""
        _barrier()
        records = _file_records(self.dir / tag)
        self.verdicts[tag] = Verdict(INTACT)
        if self.rank == 0:
            manifest.write_manifest(self.dir / tag, step, records)
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
        # keep_last counts checkpoints a resume could use: one found damaged does not count (it stays, for a
        # look, until this run saves its step again), so pruning never leaves fewer intact ones than asked for.
        usable = [t for t in self.complete_tags() if t not in self.verdicts or self.verdicts[t].loadable]
        for old in usable[: max(0, len(usable) - self.keep_last)]:
            if old != keep:  # just written and hashed: the newest intact checkpoint
                shutil.rmtree(self.dir / old, ignore_errors=True)
        for p in self.dir.iterdir():  # incomplete saves of earlier crashed runs
            if p.is_dir() and not (p / COMPLETE).exists() and p.name < keep:
                shutil.rmtree(p, ignore_errors=True)

    @contextmanager
    def reading(self, tag: str) -> Iterator[None]:
        """Turns a read failure of a checkpoint that was not checked against a manifest (written before manifests)
        into one line naming it. A verified checkpoint that fails to load keeps its traceback: that is a bug."""
        try:
            yield
        except (ValueError, FileNotFoundError):  # already one line naming the file
            raise
        except Exception as err:
            if tag in self.verdicts and self.verdicts[tag].state == INTACT:
                raise
            first = (str(err).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{self.dir / tag}: could not be read ({type(err).__name__}: {first}); it has "
                                  "no checksums to name the damaged file") from err

    def load(self, engine: Any, loader: Any, generator: torch.Generator, tag: str | None = None) -> int:
        tag = tag or self.resume_tag()
        if tag is None:
            raise FileNotFoundError(f"{self.dir}: no complete checkpoint")
        with self.reading(tag):
            return self._load(engine, loader, generator, tag)

    def _load(self, engine: Any, loader: Any, generator: torch.Generator, tag: str) -> int:
        _, client = engine.load_checkpoint(str(self.dir), tag=tag, load_module_strict=False)
        if client is None:
            raise RuntimeError(f"{self.dir / tag}: DeepSpeed could not load this checkpoint")
        self.check_base(tag, client.get("base"))
        from megafusion.training.run_setup import restore_loader  # another world size merges every rank's state

        state = restore_loader(loader, self.dir / tag, self.rank, int(client.get("world_size", self.world)))
        if state is not None:
            restore_rng(state["rng"], generator)
        if self.ema is not None:
            self.restore_ema(tag)
        return int(client["step"])

    def restore_ema(self, tag: str) -> None:
        """The weight average from the checkpoint; one saved without (the run was started with train.ema_decay
        0) starts the average from the weights it resumes."""
        path = self.dir / tag / EMA_FILE
        if path.is_file():
            from safetensors.torch import load_file

            self.ema.load_state_dict(load_file(str(path)), source=str(path))
        else:
            self.restart_ema(tag)

    def restart_ema(self, tag: str) -> None:
        """The checkpoint `tag` holds no average: start it from the weights just resumed, and say so."""
        self.ema.restart()
        _report(f"{self.dir / tag}: holds no weight average (trained without train.ema_decay); the average "
                "starts from the resumed weights")
