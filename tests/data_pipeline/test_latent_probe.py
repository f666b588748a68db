"""The latent probe: it reads digits from features that hold them and not from features that do not."""

from __future__ import annotations

import numpy as np
import torch

from megafusion.data_pipeline.demo.latent_probe import pixel_features, probe_accuracy


def test_probes_read_digits_from_8px_pixels():
    # sklearn's digits are 8x8 at source, so 8 px pixels hold the whole digit: any working probe reads them well.
    acc = probe_accuracy(pixel_features, resolution=8, splits=("test",))
    assert set(acc) == {"logistic regression", "RBF SVM", "MLP"}
    assert all(a["test"] > 0.9 for a in acc.values()), acc


def test_probes_at_chance_on_features_without_the_digit():
    def noise(images: torch.Tensor) -> np.ndarray:
        return np.random.default_rng(len(images)).normal(size=(len(images), 4))

    acc = probe_accuracy(noise, resolution=8, splits=("test",))
    assert all(a["test"] < 0.2 for a in acc.values()), acc
