"""How well the digit can be read from a VAE's latents: classifiers trained on train latents, scored on val / test.

It bounds what captioning could reach from these latents, so a caption accuracy below it is the model's, not
the VAE's. The same probes on raw pixels are printed for comparison.

    python -m data_pipeline.demo.latent_probe --vae outputs/demo/vae
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch
from diffusers import AutoencoderKL
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from ..sources import image_to_tensor
from ..vae import encode_mean
from .digits import digits_samples

Features = Callable[[torch.Tensor], np.ndarray]


def probes() -> dict[str, Callable[[], object]]:
    """A linear and two nonlinear classifiers of different kinds, all on standardised features."""
    return {
        "logistic regression": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
        "RBF SVM": lambda: make_pipeline(StandardScaler(), SVC(C=10.0)),
        "MLP": lambda: make_pipeline(StandardScaler(), MLPClassifier((256,), max_iter=500, random_state=0)),
    }


def split_tensors(split: str, resolution: int) -> tuple[torch.Tensor, np.ndarray]:
    """(images in [-1, 1], labels) of a digits split."""
    samples = digits_samples(split, resolution)
    return torch.stack([image_to_tensor(s.image) for s in samples]), np.array([s.label for s in samples])


def probe_accuracy(features: Features, resolution: int = 32,
                   splits: tuple[str, ...] = ("val", "test")) -> dict[str, dict[str, float]]:
    """{probe: {split: accuracy}} of each probe fitted on the train split's `features`."""
    data = {s: split_tensors(s, resolution) for s in ("train", *splits)}
    feats = {s: features(x) for s, (x, _) in data.items()}
    out: dict[str, dict[str, float]] = {}
    for name, make in probes().items():
        clf = make()
        clf.fit(feats["train"], data["train"][1])
        out[name] = {s: float(clf.score(feats[s], data[s][1])) for s in splits}
    return out


def vae_features(vae: AutoencoderKL) -> Features:
    """Flattened mode latents, as the shards hold them (up to the scaling factor, which standardising removes)."""
    return lambda images: encode_mean(vae, images).flatten(1).numpy()


def pixel_features(images: torch.Tensor) -> np.ndarray:
    return images[:, 0].flatten(1).numpy()  # the digits are grey: one channel holds them


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", required=True, help="diffusers AutoencoderKL directory (e.g. outputs/demo/vae)")
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args(argv)
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    for label, features in (("latents", vae_features(vae)), ("pixels", pixel_features)):
        for name, acc in probe_accuracy(features, args.resolution).items():
            print(f"{label:8s} {name:20s} " + "  ".join(f"{s} {a:.3f}" for s, a in acc.items()), flush=True)


if __name__ == "__main__":
    main()
