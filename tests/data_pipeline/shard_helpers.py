"""Helpers that build latent shard directories and tokenizers for loader tests without a VAE."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megafusion.data_pipeline.shard_format import INDEX_NAME, shard_name, write_shard_file

LATENT_SHAPE = (4, 4, 4)  # tests.helpers.TINY_IMAGE: 4 tokens per image


def make_latent_shards(root: Path, num_shards: int, per_shard: int, corrupt: tuple[int, ...] = ()) -> Path:
    """Shards whose sample i carries the latent filled with float(i) and caption `sample <i>`."""
    root.mkdir(parents=True, exist_ok=True)
    counts = []
    for k in range(num_shards):
        ids = range(k * per_shard, (k + 1) * per_shard)
        counts.append(write_shard_file(
            root / shard_name(k), ((f"sample {i}", torch.full(LATENT_SHAPE, float(i)), f"src-{i}") for i in ids)
        ))
        if k in corrupt:
            data = (root / shard_name(k)).read_bytes()
            (root / shard_name(k)).write_bytes(data[: len(data) // 3] + b"\x13garbage" * 50)
    index = {"num_shards": num_shards, "counts": counts, "latent_shape": list(LATENT_SHAPE)}
    (root / INDEX_NAME).write_text(json.dumps(index))
    return root
