"""Generated compositional images: one or two coloured shapes at named positions, with exact captions.

Each image shows one shape (on the left / on the right / at the top / at the bottom / in the center) or two
(left+right or top+bottom) on a plain light background, e.g. "a red circle on the left and a blue square on
the right". Because every caption is a rule over what is drawn, `check_image` can score generated images
exactly: it reads colour (from hue), shape (from how much of its bounding box a blob fills) and position
(from the blob's centroid) back from the pixels.

Samples are a pure function of (split, index, resolution): sample i of a split comes from its own RNG seeded
with the split's seed and i, so asking for more samples never changes the earlier ones, and no two splits
(train, val, test) share a seed.
"""

from __future__ import annotations

import colorsys
import random
import re
from collections import Counter
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .common import DemoSample, check_split

COLOURS = {
    "red": (220, 30, 30),
    "yellow": (240, 200, 20),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {
    # name: (caption phrase, centre x, centre y) in units of the image side.
    "left": ("on the left", 0.25, 0.5),
    "right": ("on the right", 0.75, 0.5),
    "top": ("at the top", 0.5, 0.25),
    "bottom": ("at the bottom", 0.5, 0.75),
    "center": ("in the center", 0.5, 0.5),
}
PAIRS = (("left", "right"), ("top", "bottom"))
BACKGROUND = (245, 245, 245)
SPLIT_SEEDS = {"train": 0, "test": 1, "val": 2}
DEFAULT_NUM_SAMPLES = {"train": 4096, "val": 256, "test": 256}
MIN_RESOLUTION = 16
_SUPERSAMPLE = 4  # draw large, then box-downsample: antialiased edges look like real images, not pixel art


class Shape(NamedTuple):
    colour: str
    shape: str
    position: str


# --- generation ---------------------------------------------------------------------------------------------


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, cx: float, cy: float, size: float) -> None:
    h = size / 2
    box = (cx - h, cy - h, cx + h, cy + h)
    fill = COLOURS[shape.colour]
    if shape.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)


def render(shapes: list[Shape], resolution: int = 32, rng: random.Random | None = None) -> Image.Image:
    """Draw `shapes` (positions must be one of the allowed layouts) with small random size/offset jitter."""
    rng = rng or random.Random(0)
    side = resolution * _SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    alone = len(shapes) == 1
    for shape in shapes:
        _, fx, fy = POSITIONS[shape.position]
        # Two shapes each own half the image: size <= 0.38 with jitter <= 0.03 leaves a gap of >= 0.06 sides
        # between them (2 px at 32 px), so they never touch; a lone shape may be bigger.
        size = rng.uniform(0.30, 0.45 if alone else 0.38) * side
        jitter = 0.03 * side
        cx, cy = fx * side + rng.uniform(-jitter, jitter), fy * side + rng.uniform(-jitter, jitter)
        _draw(draw, shape, cx, cy, size)
    return canvas.reduce(_SUPERSAMPLE)


def _phrase(shape: Shape) -> str:
    return f"a {shape.colour} {shape.shape} {POSITIONS[shape.position][0]}"


def caption_for(shapes: list[Shape]) -> str:
    return " and ".join(_phrase(s) for s in shapes)


def random_layout(rng: random.Random) -> list[Shape]:
    if rng.random() < 0.4:
        positions: tuple[str, ...] = (rng.choice(list(POSITIONS)),)
    else:
        positions = rng.choice(PAIRS)
        if rng.random() < 0.5:  # both orders occur in captions ("... right and ... left")
            positions = positions[::-1]
    return [Shape(rng.choice(list(COLOURS)), rng.choice(SHAPES), p) for p in positions]


def shapes_samples(split: str, resolution: int = 32, num_samples: int | None = None) -> list[DemoSample]:
    """`num_samples` generated images of `split` (default: 4,096 train, 256 val, 256 test)."""
    check_split(split)
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution: must be at least {MIN_RESOLUTION} for shapes to stay readable, got {resolution}")
    n = DEFAULT_NUM_SAMPLES[split] if num_samples is None else num_samples
    samples = []
    for i in range(n):
        rng = random.Random(SPLIT_SEEDS[split] * 1_000_000_007 + i)
        shapes = random_layout(rng)
        label = {"shapes": [s._asdict() for s in shapes]}
        samples.append(
            DemoSample(f"shapes-{split}-{i:06d}", render(shapes, resolution, rng), caption_for(shapes), label)
        )
    return samples


# --- checking -----------------------------------------------------------------------------------------------

_PHRASES = {phrase: name for name, (phrase, _, _) in POSITIONS.items()} | {"in the centre": "center"}
_SHAPE_RE = re.compile(
    r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")\s+(" + "|".join(_PHRASES) + r")\b",
    re.IGNORECASE,
)
_SHAPE_WORD_RE = re.compile(r"\b(" + "|".join(SHAPES) + r")s?\b", re.IGNORECASE)

_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items()}
_MIN_SATURATION = 0.35  # background is grey (saturation 0); half-covered edge pixels sit around 0.4
_MIN_VALUE = 0.25
_CENTER_RADIUS = 0.125  # centroid within this of the middle (in image sides) -> "in the center"
# Measured on generated blobs (16/32/64 px): fill of the bounding box is 1.0 for squares, 0.73-0.81 for
# circles, 0.52-0.71 for triangles; the apex-up triangle's mass sits 0.10-0.16 heights below its box centre,
# circles and squares within 0.02. Both are computed from sub-pixel coverage, so antialiasing does not bias them.
_SQUARE_FILL = 0.88
_TRIANGLE_OFFSET = 0.06
_MIN_AREA = 0.012  # blobs smaller than this fraction of the image are noise, not shapes
_BACKGROUND = np.array(BACKGROUND, dtype=np.float32)


def parse_caption(caption: str) -> list[Shape] | None:
    """The shapes a caption names, or None if it mentions a shape it does not fully describe."""
    found = [
        Shape(c.lower(), s.lower(), _PHRASES[" ".join(p.lower().split())]) for c, s, p in _SHAPE_RE.findall(caption)
    ]
    if not found or len(_SHAPE_WORD_RE.findall(caption)) != len(found):
        return None
    return found


def _colour_classes(image: Image.Image) -> np.ndarray:
    """Per pixel: index into COLOURS of the nearest hue, or -1 for background (unsaturated or dark)."""
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float32) / 255.0
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    refs = np.array(list(_HUES.values()), dtype=np.float32)
    dist = np.abs(hue[..., None] - refs)
    dist = np.minimum(dist, 1.0 - dist)  # hue is circular
    classes = dist.argmin(-1)
    classes[(sat < _MIN_SATURATION) | (val < _MIN_VALUE)] = -1
    return classes


def _coverage(pixels: np.ndarray, colour: str, mask: np.ndarray) -> np.ndarray:
    """How much of each pixel near the blob the shape covers (0..1), unmixing it from the background colour."""
    ink = np.array(COLOURS[colour], dtype=np.float32) - _BACKGROUND
    alpha = np.clip((pixels - _BACKGROUND) @ ink / (ink @ ink), 0.0, 1.0)
    return alpha * ndimage.binary_dilation(mask, structure=np.ones((3, 3)))


def _shape_of(alpha: np.ndarray) -> str:
    rows, cols = alpha.max(1), alpha.max(0)  # per-row / per-column extent profiles
    area, height, width = alpha.sum(), rows.sum(), cols.sum()
    y = np.arange(alpha.shape[0], dtype=np.float32)
    offset = ((alpha.sum(1) * y).sum() / area - (rows * y).sum() / height) / height
    if offset > _TRIANGLE_OFFSET:
        return "triangle"
    return "square" if area / (width * height) >= _SQUARE_FILL else "circle"


def _position_of(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    dx, dy = (xs.mean() + 0.5) / w - 0.5, (ys.mean() + 0.5) / h - 0.5
    if max(abs(dx), abs(dy)) < _CENTER_RADIUS:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def describe_image(image: Image.Image) -> list[Shape]:
    """The shapes visible in `image`, read from its pixels, in POSITIONS order (left, right, top, bottom, center)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    classes = _colour_classes(image)
    min_area = _MIN_AREA * classes.size
    names = list(_HUES)
    found: list[Shape] = []
    for ci, colour in enumerate(names):
        blobs, n = ndimage.label(classes == ci)  # 4-connected: corner contact does not merge blobs
        for b in range(1, n + 1):
            mask = blobs == b
            if mask.sum() < min_area:
                continue
            found.append(Shape(colour, _shape_of(_coverage(pixels, colour, mask)), _position_of(mask)))
    order = list(POSITIONS)
    return sorted(found, key=lambda s: (order.index(s.position), s))


def check_image(image: Image.Image, caption: str) -> bool:
    """True when the image shows exactly the shapes the caption names (colour, shape and position each)."""
    wanted = parse_caption(caption)
    return wanted is not None and Counter(wanted) == Counter(describe_image(image))
