"""Who decides whether a generated image shows what its prompt asked for.

A classifier's argmax alone flatters a weak generator: a softmax over digits has to name some digit, and a ReLU
network trained only on digits names one with near-certainty for a grey square or a blob (measured: probability
1.0). So a classifier judge here (1) also knows a "not a digit" class, trained on generated non-digits (flat
fields, soft blobs, smooth noise, real digits coarsened to 2-4 px), and (2) counts an image as correct only when
the asked class gets at least `threshold` probability. Two judges of different kinds score every image:

- the in-domain MLP on downsampled pixels (classifier.py; its hidden layer is also the FID feature space);
- an RBF-kernel SVM on histograms of oriented gradients (stroke directions per 8x8 cell, not raw intensities),
  with sigmoid-calibrated probabilities: a kernel machine on hand-made features, so it fails differently.

Shapes have an exact rule checker instead (RuleJudge)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

# Label of the "not a digit" class (an int: sklearn needs one label type, and digits are ints).
REJECT = -1
# Columns of a confusion matrix after the classes: the judge named no class with enough confidence.
NOT_CONFIDENT = "not confident"


class ProbabilityModel(Protocol):
    @property
    def classes(self) -> list[Hashable]: ...

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray: ...


def non_digit_images(count: int, seed: int, reals: Sequence[Image.Image], size: int = 32) -> list[Image.Image]:
    """`count` grey images that are not digits, in four kinds (round-robin): a flat field, one to three soft
    round blobs, smooth random texture, and a real digit coarsened to 2-4 px (a smudge where the digit was)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            a = np.full((size, size), rng.uniform(0, 255))
        elif kind == 1:
            a = np.zeros((size, size))
            for _ in range(int(rng.integers(1, 4))):
                cy, cx = rng.uniform(size / 4, 3 * size / 4, 2)
                sigma = rng.uniform(size / 10, size / 3)
                a += rng.uniform(100, 255) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        elif kind == 2:
            cells = int(rng.integers(2, 9))
            noise = Image.fromarray(rng.integers(0, 256, (cells, cells)).astype(np.uint8))
            a = np.asarray(noise.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
        else:
            k = int(rng.integers(2, 5))
            real = reals[int(rng.integers(len(reals)))].convert("L")
            coarse = real.resize((k, k), Image.Resampling.BOX).resize((size, size), Image.Resampling.BICUBIC)
            a = np.asarray(coarse, dtype=np.float64)
        out.append(Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), mode="L").convert("RGB"))
    return out


def hog_features(images: Sequence[Image.Image], size: int = 32, cell: int = 8, bins: int = 9) -> np.ndarray:
    """(N, (size/cell)^2 * bins) histograms of unsigned gradient orientation, weighted by gradient magnitude, per
    cell; each row L2-normalised with a floor, so a flat image stays near zero instead of amplified noise."""
    if size % cell:
        raise ValueError(f"size {size} must be a multiple of cell {cell}")
    grey = np.stack([np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
                     for im in images]) / 255.0
    gy, gx = np.gradient(grey, axis=(1, 2))
    magnitude = np.hypot(gx, gy)
    angle = np.mod(np.arctan2(gy, gx), np.pi)
    which = np.minimum((angle / np.pi * bins).astype(np.int64), bins - 1)
    onehot = (which[..., None] == np.arange(bins)) * magnitude[..., None]  # (N, size, size, bins)
    n = size // cell
    hist = onehot.reshape(len(grey), n, cell, n, cell, bins).sum(axis=(2, 4)).reshape(len(grey), -1)
    return hist / np.sqrt((hist**2).sum(axis=1, keepdims=True) + 1e-2)


@dataclass
class HogSvmClassifier:
    """RBF-kernel SVM on HOG features with calibrated class probabilities."""

    model: object
    size: int

    @property
    def classes(self) -> list[Hashable]:
        return self.model.classes_.tolist()

    def probabilities(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.model.predict_proba(hog_features(images, self.size))

    def predict(self, images: Sequence[Image.Image]) -> list[Hashable]:
        probs = self.probabilities(images)
        return [self.classes[i] for i in probs.argmax(axis=1)]


def train_hog_svm(images: Sequence[Image.Image], labels: Sequence[Hashable], size: int = 32,
                  c: float = 3.0) -> HogSvmClassifier:
    """Fit in a few seconds on ~1,400 images. Probabilities: Platt scaling fitted on 5-fold out-of-fold decision
    values (sklearn's CalibratedClassifierCV; SVC's own probability=True is deprecated)."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.svm import SVC
    from threadpoolctl import threadpool_limits

    model = CalibratedClassifierCV(SVC(kernel="rbf", C=c), ensemble=False)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.fit(hog_features(images, size), list(labels))
    return HogSvmClassifier(model, size)


@dataclass
class ClassifierJudge:
    """Correct = the asked class has probability >= threshold (so also the judge's confident argmax)."""

    name: str
    kind: str
    model: ProbabilityModel
    threshold: float

    def judged(self, images: Sequence[Image.Image]) -> list[Hashable | None]:
        """Per image: the class named with probability >= threshold, or None (not confident, or not a digit)."""
        return confident_labels(self.model.probabilities(images), self.model.classes, self.threshold)

    def verdicts(self, images: Sequence[Image.Image], asked: Sequence[Hashable], texts: Sequence[str]) -> list[bool]:
        return [j is not None and j == a for j, a in zip(self.judged(images), asked, strict=True)]


@dataclass
class RuleJudge:
    """An exact check of the image against the prompt's text (shapes)."""

    name: str
    kind: str
    check: Callable[[Image.Image, str], bool]

    def verdicts(self, images: Sequence[Image.Image], asked: Sequence[Hashable], texts: Sequence[str]) -> list[bool]:
        return [self.check(im, t) for im, t in zip(images, texts, strict=True)]


def confident_labels(probabilities: np.ndarray, classes: Sequence[Hashable], threshold: float) -> list[Hashable | None]:
    """The argmax class where its probability reaches `threshold` and it is not REJECT; None elsewhere."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"confidence threshold: must be in (0, 1], got {threshold}")
    best = probabilities.argmax(axis=1)
    out: list[Hashable | None] = []
    for row, i in enumerate(best):
        label = classes[i]
        out.append(label if probabilities[row, i] >= threshold and label != REJECT else None)
    return out


def confusion_matrix(asked: Sequence[Hashable], judged: Sequence[Hashable | None],
                     labels: Sequence[Hashable]) -> list[list[int]]:
    """Counts[asked class][judged class], rows in `labels` order; the last column counts None (not confident)."""
    column = {label: i for i, label in enumerate(labels)}
    counts = [[0] * (len(labels) + 1) for _ in labels]
    for a, j in zip(asked, judged, strict=True):
        counts[column[a]][len(labels) if j is None else column[j]] += 1
    return counts
