"""What every built-in demo dataset yields."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from PIL import Image

# "val" is carved out of what used to be train: settings are chosen on it, and the report's numbers come from
# "test", which no choice has looked at.
SPLITS = ("train", "val", "test")


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


def split_fingerprint(dataset: str, split: str) -> str:
    """A short hash of which samples `split` of a demo dataset holds, for caches built from it (latent shards, a
    demo VAE): a changed split definition changes it, so a stale cache is rebuilt instead of silently reused."""
    check_split(split)
    if dataset == "digits":
        from .digits import split_indices

        identity = "digits:" + ",".join(map(str, split_indices(split)))
    elif dataset == "shapes":
        from .shapes import DEFAULT_NUM_SAMPLES, SPLIT_SEEDS

        identity = f"shapes:seed={SPLIT_SEEDS[split]}:n={DEFAULT_NUM_SAMPLES[split]}"
    else:
        raise ValueError(f"dataset: must be digits or shapes, got {dataset!r}")
    return hashlib.sha256(identity.encode()).hexdigest()[:16]
