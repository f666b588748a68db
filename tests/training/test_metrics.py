"""Metrics sinks: JSONL always, wandb in offline mode when asked (no network involved)."""

import json
from dataclasses import dataclass

from megafusion.training.metrics import MetricsLogger, peak_memory_bytes


@dataclass
class _Cfg:
    lr: float = 1.0


def test_jsonl_and_wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, enabled=True, wandb_mode="offline", project="megafusion-test", config=_Cfg())
    logger.log({"step": 1, "loss": 2.5, "mfu": None})
    logger.log({"step": 2, "loss": 2.0, "mfu": None})
    logger.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines] == [2.5, 2.0]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(runs[0].rglob("*.wandb"))


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "x", enabled=False, wandb_mode="offline", project="p", config=_Cfg())
    logger.log({"step": 1})
    logger.close()
    assert not (tmp_path / "x").exists()
    assert peak_memory_bytes() > 0
