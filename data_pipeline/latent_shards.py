"""Offline VAE latent precompute into WebDataset shards (`megafusion precompute-latents`).

The source is enumerated in a fixed order and cut into shards of `shard_size` samples; shard k belongs to
rank k % world_size, so ranks split the work without talking to each other and a rerun skips every shard that
is already complete (a shard is written to a temp file and renamed, with a sidecar written after it)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from megafusion.common.atomic import write_json_atomic
from megafusion.data_pipeline.augment import AffineJitter, with_augmented_copies
from megafusion.data_pipeline.shard_format import INDEX_NAME, shard_name, write_shard_file
from megafusion.data_pipeline.sources import RawSample, SkipLog, center_crop_resize, image_to_tensor, iter_source
from megafusion.data_pipeline.vae import load_vae, vae_identity

SIDECAR_SUFFIX = ".json"
SOURCE_SKIPS_NAME = "source-skips.json"


@dataclass
class PrecomputeSummary:
    shards_written: int
    shards_skipped: int
    samples_written: int
    samples_skipped: int
    seconds: float
    index_written: bool


def _batched(items: list[RawSample], size: int) -> Iterator[list[RawSample]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class LatentShardWriter:
    """Encodes images with a frozen VAE and writes one shard (tar + sidecar) atomically."""

    def __init__(self, vae_dir: str | Path, resolution: int, sample_posterior: bool = False,
                 batch_size: int = 16, seed: int = 0, augment: dict | None = None) -> None:
        self.vae = load_vae(vae_dir)
        self.augment = augment  # recorded in each sidecar: which augmentation made the shard's copies
        self.scaling = float(self.vae.config.scaling_factor)
        self.resolution, self.sample_posterior = resolution, sample_posterior
        self.batch_size, self.seed = batch_size, seed

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(images).latent_dist
        latent = dist.sample(generator) if self.sample_posterior else dist.mode()
        # Same convention as inference decoding: (z - shift) * scale (shift_factor is 0 for SD-style VAEs).
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latent - shift) * self.scaling

    def write_shard(self, path: Path, samples: list[RawSample], progress: tqdm | None = None) -> dict:
        skips = SkipLog()
        shape: list[int] | None = None
        # Seeded per shard so a rerun or another rank produces the same posterior samples.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(path.stem.split("-")[-1]))

        def items() -> Iterator[tuple[str, torch.Tensor, str]]:
            nonlocal shape
            for batch in _batched(samples, self.batch_size):
                keep, pixels = [], []
                for sample in batch:
                    if not sample.caption:
                        skips.record(sample.key, "no caption")
                        continue
                    try:
                        image = center_crop_resize(sample.load_image(), self.resolution)
                    except Exception as err:  # any decoder error means this one image is unusable
                        skips.record(sample.key, f"unreadable image: {type(err).__name__}: {err}")
                        continue
                    keep.append(sample)
                    pixels.append(image_to_tensor(image))
                if keep:
                    latents = self.encode(torch.stack(pixels), generator)
                    shape = list(latents.shape[1:])
                    yield from ((s.caption, lat, s.key) for s, lat in zip(keep, latents, strict=True))
                if progress is not None:
                    progress.update(len(batch))

        count = write_shard_file(path, items())
        sidecar = {"shard": path.name, "count": count, "latent_shape": shape, "skipped": skips.entries,
                   "source_keys": [s.key for s in samples], "augment": self.augment}
        write_json_atomic(path.with_suffix(SIDECAR_SUFFIX), sidecar)
        return sidecar


def _is_complete(shard: Path, augment: dict | None) -> bool:
    sidecar = shard.with_suffix(SIDECAR_SUFFIX)
    if not (shard.is_file() and sidecar.is_file()):
        return False
    found = json.loads(sidecar.read_text()).get("augment")
    if found != augment:
        raise ValueError(f"{shard}: written with augmentation {found}, this run asks for {augment}; "
                         "use another --out or delete the shards")
    return True


def precompute_latents(
    vae_dir: str | Path,
    source: str,
    out_dir: str | Path,
    resolution: int = 256,
    batch_size: int = 16,
    shard_size: int = 1000,
    rank: int = 0,
    world_size: int = 1,
    sample_posterior: bool = False,
    split: str = "train",
    seed: int = 0,
    progress: bool = True,
    augment: AffineJitter | None = None,
) -> PrecomputeSummary:
    """`augment` adds transformed copies of every image (data_pipeline.augment); shards already written with
    other augmentation settings are an error rather than mixed in."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    start = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source_skips = SkipLog()
    samples = list(iter_source(source, source_skips, split=split, resolution=resolution))
    if not samples:
        raise ValueError(f"{source}: no samples found (skipped: {source_skips.entries[:5]})")
    jitter = augment or AffineJitter()
    samples = with_augmented_copies(samples, jitter)
    recorded = jitter.record()  # what every sidecar and the index say about the copies
    write_json_atomic(out / SOURCE_SKIPS_NAME, {"skipped": source_skips.entries})
    chunks = [samples[i : i + shard_size] for i in range(0, len(samples), shard_size)]
    mine = [k for k in range(len(chunks)) if k % world_size == rank]
    todo = [k for k in mine if not _is_complete(out / shard_name(k), recorded)]

    writer = LatentShardWriter(vae_dir, resolution, sample_posterior, batch_size, seed, recorded)
    written = skipped = 0
    bar = tqdm(total=sum(len(chunks[k]) for k in todo), unit="img", desc=f"latents rank {rank}",
               disable=not progress)
    for k in todo:
        sidecar = writer.write_shard(out / shard_name(k), chunks[k], bar)
        written += sidecar["count"]
        skipped += len(sidecar["skipped"])
    bar.close()

    index_written = _write_index_if_complete(out, len(chunks), vae_dir, resolution, sample_posterior, source, split,
                                             recorded)
    return PrecomputeSummary(len(todo), len(mine) - len(todo), written, skipped, time.monotonic() - start,
                             index_written)


def _write_index_if_complete(out: Path, num_shards: int, vae_dir: str | Path, resolution: int,
                             sample_posterior: bool, source: str, split: str, augment: dict | None) -> bool:
    """Whichever rank finishes last sees every sidecar and writes index.json."""
    shards = [out / shard_name(k) for k in range(num_shards)]
    if not all(_is_complete(s, augment) for s in shards):
        return False
    sidecars = [json.loads(s.with_suffix(SIDECAR_SUFFIX).read_text()) for s in shards]
    shapes = {tuple(c["latent_shape"]) for c in sidecars if c["latent_shape"]}
    if len(shapes) != 1:
        raise ValueError(f"{out}: shards disagree on the latent shape: {sorted(shapes)}")
    source_skips = json.loads((out / SOURCE_SKIPS_NAME).read_text())["skipped"]
    skipped = source_skips + [entry for c in sidecars for entry in c["skipped"]]
    index = {
        "format": "megafusion.latent_shards",
        "format_version": 1,
        "num_shards": num_shards,
        "shards": [s.name for s in shards],
        "counts": [c["count"] for c in sidecars],
        "num_samples": sum(c["count"] for c in sidecars),
        "latent_shape": list(shapes.pop()),
        "latent_dtype": "float16",
        "scaled_by_vae_scaling_factor": True,
        "latent_mode": "sample" if sample_posterior else "mean",
        "resolution": resolution,
        "source": source,
        "split": split,
        "augment": augment,
        "vae": vae_identity(vae_dir),
        "num_skipped": len(skipped),
        "skipped": skipped,
    }
    write_json_atomic(out / INDEX_NAME, index)
    return True
