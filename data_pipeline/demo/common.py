"""What every built-in demo dataset yields."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

SPLITS = ("train", "test")


@dataclass
class DemoSample:
    """One demo image with its caption; `key` is stable across runs and unique within the dataset."""

    key: str
    image: Image.Image
    caption: str
    label: int | str | dict


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: must be one of {SPLITS}, got {split!r}")
