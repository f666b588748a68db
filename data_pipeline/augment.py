"""Offline image augmentation for the latent precompute: extra copies of every image under a small random affine.

Latents are encoded once, before training, so an augmentation has to happen here: each copy is its own sample
(key `<key>-aug<k>`) with its own latent. Every copy's transform is drawn from a generator seeded by its key, so a
rerun, another rank or another machine writes the same shards. Meant for centred objects on a black background
(the digits demo): corners uncovered by a rotation or shift are filled with black, and captions are kept as they
are, so never use it where a caption names a position or an orientation (the shapes demo).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from .sources import RawSample


@dataclass(frozen=True)
class AffineJitter:
    """`copies` extra samples per image, each rotated, scaled and shifted by amounts drawn uniformly from
    [-rotate_deg, rotate_deg], [1 - scale, 1 + scale] and [-shift, shift] (a fraction of the image side)."""

    copies: int = 0
    rotate_deg: float = 10.0
    scale: float = 0.1
    shift: float = 0.0625

    def __post_init__(self) -> None:
        checks = [
            (self.copies >= 0, f"copies: must be >= 0, got {self.copies}"),
            (0.0 <= self.rotate_deg <= 180.0, f"rotate_deg: must be in [0, 180], got {self.rotate_deg}"),
            (0.0 <= self.scale < 1.0, f"scale: must be in [0, 1), got {self.scale}"),
            (0.0 <= self.shift <= 0.5, f"shift: must be in [0, 0.5], got {self.shift}"),
        ]
        errors = [msg for ok, msg in checks if not ok]
        if errors:
            raise ValueError("augmentation: " + "; ".join(errors))

    def record(self) -> dict[str, Any] | None:
        """What the shard index and sidecars store: None when there are no copies (nothing was augmented)."""
        return asdict(self) if self.copies else None

    def params(self, key: str, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The affine drawn for `key` on an image of `size`: (rotation in degrees, counter-clockwise as shown;
        scale; shift x, shift y in pixels)."""
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        angle = rng.uniform(-self.rotate_deg, self.rotate_deg)
        factor = rng.uniform(1.0 - self.scale, 1.0 + self.scale)
        tx, ty = rng.uniform(-self.shift, self.shift, 2) * size
        return float(angle), float(factor), float(tx), float(ty)

    def transform(self, image: Image.Image, key: str) -> Image.Image:
        """`image` scaled and rotated about its centre, then shifted, by the affine drawn for `key`."""
        angle, factor, tx, ty = self.params(key, image.size)
        cx, cy = (image.size[0] - 1) / 2, (image.size[1] - 1) / 2
        # PIL wants the output -> input map, the inverse of the forward one (image y points down, so a
        # counter-clockwise turn on screen is a clockwise one in these coordinates).
        rad = math.radians(angle)
        a, b = math.cos(rad) / factor, -math.sin(rad) / factor
        d, e = -b, a
        c = cx - a * (cx + tx) - b * (cy + ty)
        f = cy - d * (cx + tx) - e * (cy + ty)
        return image.transform(image.size, Image.Transform.AFFINE, (a, b, c, d, e, f),
                               resample=Image.Resampling.BICUBIC)


def with_augmented_copies(samples: list[RawSample], jitter: AffineJitter) -> list[RawSample]:
    """`samples`, then `jitter.copies` passes over them with transformed images: one pass after another rather
    than each image's copies side by side, so a shard holds many different images and no image's copies share
    a packed row more often than chance."""
    out = list(samples)
    for k in range(1, jitter.copies + 1):
        for sample in samples:
            key = f"{sample.key}-aug{k}"
            out.append(RawSample(key, sample.caption, _transformed(sample.load_image, jitter, key)))
    return out


def _transformed(load: Callable[[], Image.Image], jitter: AffineJitter, key: str) -> Callable[[], Image.Image]:
    return lambda: jitter.transform(load(), key)
