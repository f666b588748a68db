"""Helpers that build latent shard directories and tokenizers for loader tests without a VAE."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch
from webdataset import TarWriter

from megafusion.data_pipeline.shard_format import INDEX_NAME, encode_latent, shard_name

LATENT_SHAPE = (4, 4, 4)  # tests.helpers.TINY_IMAGE: 4 tokens per image


def write_byte_tiktoken(path: Path) -> Path:
    """A byte-level tiktoken BPE file (256 single-byte tokens, no merges): tiny and offline."""
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return path


def make_latent_shards(root: Path, num_shards: int, per_shard: int, corrupt: tuple[int, ...] = ()) -> Path:
    """Shards whose sample i carries the latent filled with float(i) and caption `sample <i>`."""
    root.mkdir(parents=True, exist_ok=True)
    counts = []
    i = 0
    for k in range(num_shards):
        with open(root / shard_name(k), "wb") as fh, TarWriter(fh, encoder=False) as tar:
            for j in range(per_shard):
                tar.write({"__key__": f"{j:08d}", "latent.npy": encode_latent(torch.full(LATENT_SHAPE, float(i))),
                           "txt": f"sample {i}".encode(), "json": json.dumps({"source_key": f"src-{i}"}).encode()})
                i += 1
        counts.append(per_shard)
        if k in corrupt:
            data = (root / shard_name(k)).read_bytes()
            (root / shard_name(k)).write_bytes(data[: len(data) // 3] + b"\x13garbage" * 50)
    index = {"num_shards": num_shards, "counts": counts, "latent_shape": list(LATENT_SHAPE)}
    (root / INDEX_NAME).write_text(json.dumps(index))
    return root
