"""SLURM preemption and time limits: on SIGTERM or SIGUSR1 every rank finishes its current optimizer step, a
checkpoint is saved, and the run exits with PREEMPTED_EXIT_CODE, which launchers/slurm.sbatch turns into a
requeue (`#SBATCH --signal=USR1@120`, `--requeue`). The rerun resumes from that checkpoint exactly."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from megafusion.training.callbacks import Callback

log = logging.getLogger(__name__)

# EX_TEMPFAIL: "try again later". The batch script requeues on exactly this code.
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits the process with PREEMPTED_EXIT_CODE."""

    def __init__(self, step: int) -> None:
        super().__init__(PREEMPTED_EXIT_CODE)
        self.step = step


class PreemptionGuard(Callback):
    """Notes a signal (never acts inside the handler: a half-applied step must not be saved) and, at the next step
    end, agrees with every rank that one arrived, saves through `save(step)` unless that step was just saved, and
    raises Preempted. Ranks may be signalled at different moments; the all-reduce makes them stop at the same
    step."""

    def __init__(self, save: Callable[[int], Any], already_saved: Callable[[int], bool]) -> None:
        self.save, self.already_saved = save, already_saved
        self.received: int | None = None
        self._previous = {sig: signal.signal(sig, self._note) for sig in SIGNALS}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def _any_rank_signalled(self) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, step: int) -> None:
        if not self._any_rank_signalled():
            return
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        if not self.already_saved(step):
            self.save(step)
        log.warning("%s: checkpoint of step %d saved; exiting with %d for a requeue", name, step,
                    PREEMPTED_EXIT_CODE)
        raise Preempted(step)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
