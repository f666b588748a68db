"""The on-disk format of latent shards: WebDataset tars of `<key>.latent.npy` (fp16, already multiplied by the
VAE's scaling factor), `<key>.txt` (caption) and `<key>.json` (source key), plus `index.json` for the set."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_iterator

from megafusion.common.atomic import atomic_file, remove_stale_tmp

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
LATENT_FIELD, CAPTION_FIELD, META_FIELD = "latent.npy", "txt", "json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def encode_latent(latent: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, latent.detach().to(torch.float16).cpu().numpy(), allow_pickle=False)
    return buf.getvalue()


def decode_latent(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


@dataclass
class LatentRecord:
    key: str
    caption: str
    latent: torch.Tensor


def read_shard(path: Path, on_skip: Callable[[str, str], None]) -> Iterator[LatentRecord]:
    """Samples of one shard in stored order. A bad sample is reported through `on_skip(key, reason)` and
    skipped; a corrupt or truncated tar ends that shard's stream (reported too) instead of crashing."""
    def stop(err: Exception) -> bool:
        on_skip(str(path), f"unreadable tar: {err}")
        return False

    try:
        with open(path, "rb") as fh:
            members = ({**m, "__url__": str(path)} for m in tar_file_iterator(fh, handler=stop))
            for raw in group_by_keys(members, handler=stop):
                key = raw.get("__key__", "?")
                try:
                    latent = decode_latent(raw[LATENT_FIELD])
                    caption = raw[CAPTION_FIELD].decode("utf-8")
                    # The source's key (image file, manifest line, demo id) names the sample in logs and batches.
                    key = json.loads(raw[META_FIELD]).get("source_key", key) if META_FIELD in raw else key
                except (KeyError, ValueError, UnicodeDecodeError, OSError) as err:
                    on_skip(f"{path}:{key}", f"bad sample: {type(err).__name__}: {err}")
                    continue
                yield LatentRecord(key, caption, latent)
    except (OSError, tarfile.TarError) as err:
        on_skip(str(path), f"unreadable tar: {err}")


def read_index(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / INDEX_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run `megafusion precompute-latents` to create the shards")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err


def write_shard_file(path: Path, items: Iterable[tuple[str, torch.Tensor, str]]) -> int:
    """Writes (caption, latent, source_key) items as one shard; temp file + rename, so a shard is whole or absent.
    Returns the number of samples written."""
    remove_stale_tmp(path)  # a killed earlier attempt at this shard
    count = 0
    with atomic_file(path) as tmp, open(tmp, "wb") as fh, TarWriter(fh, encoder=False) as tar:
        for caption, latent, source_key in items:
            tar.write({
                "__key__": f"{count:08d}",
                LATENT_FIELD: encode_latent(latent),
                CAPTION_FIELD: caption.encode("utf-8"),
                META_FIELD: json.dumps({"source_key": source_key}).encode("utf-8"),
            })
            count += 1
    return count
