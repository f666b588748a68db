"""Real handwritten digits from scikit-learn (`load_digits`: 1,797 8x8 images, 10 classes) with captions.

Split (fixed, independent of any seed): sample i of `load_digits()` is in `test` when i % 5 == 0 (360 images;
the dataset is ordered roughly 0..9 repeating, so every class lands there in about the same proportion). Of the
rest, `val` takes exactly 20 per class (200 images), spread evenly over each class's indices so that it spans
the whole collection rather than its first writers; `train` is what remains (1,237 images).

Images are light-grey ink on black, upscaled from 8x8 with bicubic interpolation (the strokes stay smooth
instead of blocky). The caption template is picked from the key's CRC32, so it is deterministic but not
tied to the label or to the sample index pattern.
"""

from __future__ import annotations

import re
import zlib
from functools import lru_cache

import numpy as np
from PIL import Image

from .common import DemoSample, check_split

TEST_EVERY = 5
VAL_PER_CLASS = 20
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# {d} is the numeral, {word} the English word.
DIGIT_CAPTION_TEMPLATES = (
    "a handwritten digit {d}",
    "the number {word}",
    "a drawing of the digit {d}",
    "{d} written by hand",
    "a handwritten {word}",
    "the digit {word}, written by hand",
    "a scanned handwritten {d}",
)

_WORD_TO_DIGIT = {w: i for i, w in enumerate(DIGIT_WORDS)}
_DIGIT_TOKEN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.IGNORECASE)


def digit_caption(label: int, key: str) -> str:
    template = DIGIT_CAPTION_TEMPLATES[zlib.crc32(key.encode()) % len(DIGIT_CAPTION_TEMPLATES)]
    return template.format(d=label, word=DIGIT_WORDS[label])


def digit_from_caption(caption: str) -> int | None:
    """The digit a caption names, or None when it names none or several different ones.

    Accepts numerals and English words as standalone tokens, so text produced by a captioning model
    ("The number Seven.") is scored the same way as the templates.
    """
    found = {m.lower() for m in _DIGIT_TOKEN.findall(caption)}
    digits = {_WORD_TO_DIGIT.get(tok, None) if not tok.isdigit() else int(tok) for tok in found}
    return digits.pop() if len(digits) == 1 else None


@lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images, data.target


def _to_image(pixels: np.ndarray, resolution: int) -> Image.Image:
    # load_digits pixels are ink intensities in 0..16.
    grey = np.clip(pixels * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    img = Image.fromarray(grey, mode="L").resize((resolution, resolution), Image.Resampling.BICUBIC)
    return img.convert("RGB")


@lru_cache(maxsize=1)
def _split_of_index() -> tuple[str, ...]:
    targets = _load()[1]
    split = ["test" if i % TEST_EVERY == 0 else "train" for i in range(len(targets))]
    for label in range(len(DIGIT_WORDS)):
        pool = [i for i in range(len(targets)) if split[i] == "train" and targets[i] == label]
        # Midpoints of VAL_PER_CLASS equal strides: evenly spread, never the class's very first sample.
        for j in range(VAL_PER_CLASS):
            split[pool[(2 * j + 1) * len(pool) // (2 * VAL_PER_CLASS)]] = "val"
    return tuple(split)


def split_indices(split: str) -> list[int]:
    """Indices into `load_digits()` of `split`, ascending."""
    check_split(split)
    return [i for i, s in enumerate(_split_of_index()) if s == split]


def digits_samples(split: str, resolution: int = 32) -> list[DemoSample]:
    """All digits of `split` ("train": 1,237, "val": 200, "test": 360) as RGB images of `resolution` px, in index
    order."""
    if resolution < 8:
        raise ValueError(f"resolution: must be at least 8 (the source images are 8x8), got {resolution}")
    images, targets = _load()
    samples = []
    for i in split_indices(split):
        key = f"digits-{split}-{i:06d}"
        label = int(targets[i])
        samples.append(DemoSample(key, _to_image(images[i], resolution), digit_caption(label, key), label))
    return samples
