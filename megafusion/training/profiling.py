"""`train.profile_step=N`: torch.profiler around optimizer step N, written beside the run's metrics.

Where a step's time goes on a given machine (matmuls vs elementwise work vs the optimizer vs engine overhead)
differs by CPU and dtype; a table and a Chrome trace from the real loop answer it without a separate script."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megafusion.training.callbacks import Callback

log = logging.getLogger(__name__)
TABLE_ROWS = 30


class StepProfiler(Callback):
    """Profiles every micro-batch and the optimizer step of step `step` on this rank; writes
    `profile/step-N-rank-R.txt` (ops by self CPU time) and `.json` (Chrome trace: chrome://tracing, Perfetto)."""

    def __init__(self, step: int, out_dir: Path, rank: int) -> None:
        self.step, self.out_dir, self.rank = step, out_dir, rank
        self._profiler: torch.profiler.profile | None = None

    def on_step_start(self, step: int) -> None:
        if step == self.step:
            self._profiler = torch.profiler.profile(record_shapes=True)
            self._profiler.__enter__()

    def on_step_end(self, step: int) -> None:
        if self._profiler is None or step != self.step:
            return
        self._profiler.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stem = self.out_dir / f"step-{step}-rank-{self.rank}"
        table = self._profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=TABLE_ROWS)
        stem.with_suffix(".txt").write_text(f"threads: {torch.get_num_threads()}\n{table}\n")
        self._profiler.export_chrome_trace(str(stem.with_suffix(".json")))
        self._profiler = None
        log.warning("profile of step %d written to %s.txt", step, stem)

    def close(self) -> None:
        if self._profiler is not None:  # the run ended inside the profiled step
            self._profiler.__exit__(None, None, None)
            self._profiler = None
