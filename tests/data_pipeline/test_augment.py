"""Offline augmentation: copies, keys, determinism, and the geometry of the drawn affine."""

import math

import numpy as np
import pytest
from PIL import Image

from megafusion.data_pipeline.augment import AffineJitter, with_augmented_copies
from megafusion.data_pipeline.sources import RawSample


def _dot(size: int, x: int, y: int) -> Image.Image:
    pixels = np.zeros((size, size), np.uint8)
    pixels[y - 1 : y + 2, x - 1 : x + 2] = 255  # 3x3: survives bicubic resampling as one clear peak
    return Image.fromarray(pixels, mode="L").convert("RGB")


def _peak(image: Image.Image) -> tuple[float, float]:
    """Intensity-weighted centre of the bright pixels."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    grey = np.where(grey > 0.3 * grey.max(), grey, 0.0)
    ys, xs = np.indices(grey.shape)
    return float((xs * grey).sum() / grey.sum()), float((ys * grey).sum() / grey.sum())


def test_copies_follow_the_originals_pass_by_pass():
    originals = [RawSample(f"k{i}", f"caption {i}", lambda i=i: _dot(32, 10 + i, 12)) for i in range(3)]
    out = with_augmented_copies(originals, AffineJitter(copies=2))
    assert [s.key for s in out] == ["k0", "k1", "k2", "k0-aug1", "k1-aug1", "k2-aug1", "k0-aug2", "k1-aug2",
                                    "k2-aug2"]
    assert out[:3] == originals
    assert [s.caption for s in out[3:]] == ["caption 0", "caption 1", "caption 2"] * 2
    assert with_augmented_copies(originals, AffineJitter()) == originals


def test_a_copy_is_the_same_on_every_call_and_differs_between_copies():
    jitter = AffineJitter(copies=1)
    image = _dot(32, 11, 19)
    first = np.asarray(jitter.transform(image, "k0-aug1"))
    assert np.array_equal(first, np.asarray(jitter.transform(image, "k0-aug1")))
    assert not np.array_equal(first, np.asarray(jitter.transform(image, "k0-aug2")))


@pytest.mark.parametrize("key", ["a-aug1", "b-aug2", "c-aug3", "d-aug4"])
def test_a_point_lands_where_the_drawn_affine_sends_it(key):
    jitter = AffineJitter(copies=1, rotate_deg=30.0, scale=0.2, shift=0.1)
    size, (x, y) = 48, (30, 16)
    angle, factor, tx, ty = jitter.params(key, (size, size))
    assert abs(angle) <= 30 and abs(factor - 1) <= 0.2 and abs(tx) <= 4.8 and abs(ty) <= 4.8
    # Counter-clockwise as seen on screen, where y points down.
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    centre = (size - 1) / 2
    dx, dy = x - centre, y - centre
    want = (centre + tx + factor * (c * dx + s * dy), centre + ty + factor * (-s * dx + c * dy))
    got = _peak(jitter.transform(_dot(size, x, y), key))
    assert math.dist(got, want) < 0.6, (got, want, (angle, factor, tx, ty))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="copies: must be >= 0.*scale: must be in"):
        AffineJitter(copies=-1, scale=1.5)
    assert AffineJitter().record() is None
    assert AffineJitter(copies=2).record()["copies"] == 2
