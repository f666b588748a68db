"""Where step metrics go: a JSONL file always, wandb when asked (rank 0 only)."""

from __future__ import annotations

import json
import resource
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class MetricsLogger:
    def __init__(self, output_dir: Path, enabled: bool, wandb_mode: str, project: str, config: Any) -> None:
        self.enabled = enabled
        self._wandb = None
        self._file = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)
        if wandb_mode != "off":
            import wandb

            self._wandb = wandb.init(project=project, mode=wandb_mode, dir=str(output_dir), config=asdict(config))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
