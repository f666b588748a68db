"""What a `data.shards` value names: a directory written by `megafusion precompute-latents`, or a built-in dataset
(`builtin:<name>`) that is built once into a cache directory by its demo module."""

from __future__ import annotations

from pathlib import Path

BUILTIN_PREFIX = "builtin:"
# builtin name -> split of scikit-learn's 8x8 digits used directly as 1x8x8 latents (demo/pixel_latents.py).
BUILTIN_SHARDS = {"digits-pixels": "train", "digits-pixels-test": "test"}


def resolve_shards(spec: str, cache_dir: str | Path) -> Path:
    """`builtin:<name>` -> its shard directory under `cache_dir` (built on first use); anything else is a path."""
    if not spec.startswith(BUILTIN_PREFIX):
        return Path(spec)
    name = spec[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_SHARDS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_SHARDS)
        raise ValueError(f"data.shards: unknown built-in dataset {spec!r} (known: {known})")
    # Imported here so that only runs on built-in data load the demo datasets.
    from megafusion.data_pipeline.demo.pixel_latents import build_pixel_latent_shards

    split = BUILTIN_SHARDS[name]
    return build_pixel_latent_shards(Path(cache_dir) / "data" / f"digits-pixels-{split}", split)
