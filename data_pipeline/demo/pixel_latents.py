"""`builtin:digits-pixels`: scikit-learn's 8x8 digits used directly as 1x8x8 "latents" (no VAE needed).

The smallest real dataset the trainer can run on: tests and configs/tiny-cpu.yaml train on it in seconds.
The shards are cached (shard_specs.resolve_shards picks the directory); index.json records which samples they
hold, and a cache built from another split definition is rebuilt in place, not reused."""

from __future__ import annotations

from pathlib import Path

import torch

from megafusion.common.atomic import write_json_atomic
from megafusion.data_pipeline.demo.common import split_fingerprint
from megafusion.data_pipeline.demo.digits import _load, digit_caption, split_indices
from megafusion.data_pipeline.shard_format import INDEX_NAME, read_index, shard_name, write_shard_file

LATENT_SHAPE = (1, 8, 8)
# Bump when the pixel -> latent mapping or the caption rule changes: part of the cache's identity.
CONTENT_VERSION = 2


def _content_id(split: str) -> str:
    return f"v{CONTENT_VERSION}-{split_fingerprint('digits', split)}"


def build_pixel_latent_shards(out_dir: str | Path, split: str = "train", shard_size: int = 128) -> Path:
    """Writes shards + index.json unless they hold this split already; pixel values 0..16 are mapped to [-1, 1]
    like VAE-scaled latents."""
    out = Path(out_dir)
    content = _content_id(split)
    if (out / INDEX_NAME).is_file() and read_index(out).get("content") == content:
        return out
    # Stale or partial: the index goes first, so no reader trusts the old one while the shards are replaced.
    (out / INDEX_NAME).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = _load()
    indices = split_indices(split)
    counts = []
    for k, start in enumerate(range(0, len(indices), shard_size)):
        chunk = indices[start : start + shard_size]
        items = (
            (digit_caption(int(labels[i]), f"digits-{split}-{i:06d}"),
             torch.tensor(images[i], dtype=torch.float32).reshape(LATENT_SHAPE) / 8.0 - 1.0,
             f"digits-{split}-{i:06d}")
            for i in chunk
        )
        counts.append(write_shard_file(out / shard_name(k), items))
    current = {shard_name(k) for k in range(len(counts))}
    for old in out.glob(shard_name(0).replace("000000", "*")):  # a larger old split's shards, now not indexed
        if old.name not in current:
            old.unlink()
    write_json_atomic(out / INDEX_NAME, {
        "format": "megafusion.latent_shards", "format_version": 1, "num_shards": len(counts), "counts": counts,
        "num_samples": sum(counts), "latent_shape": list(LATENT_SHAPE), "latent_dtype": "float16",
        "source": "builtin:digits-pixels", "split": split, "content": content, "vae": None, "num_skipped": 0,
        "skipped": [],
    })
    return out
