"""Frechet distance between two Gaussians fitted to feature sets (the formula behind FID), and the status of
standard Inception FID, which needs weights this package never downloads."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from scipy import linalg

# File names under which the usual FID Inception weights are cached (pytorch-fid, torch-fidelity/torchmetrics).
INCEPTION_WEIGHT_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features; N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: means {mu1.shape} vs {mu2.shape}, covariances {sigma1.shape} vs "
                         f"{sigma2.shape}")
    with warnings.catch_warnings():
        # Fewer samples than feature dimensions make the product singular; sqrtm warns but its root is still
        # usable unless it is not finite, which the ridge below handles.
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    # sqrtm of a product of PSD matrices is real in theory; numerical noise leaves tiny imaginary parts.
    covmean = np.real(covmean)
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def feature_fid(real: np.ndarray, generated: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(generated))


def find_inception_weights() -> Path | None:
    """Locally cached FID Inception weights, if any (torch hub cache or $MEGAFUSION_INCEPTION_WEIGHTS)."""
    env = os.environ.get("MEGAFUSION_INCEPTION_WEIGHTS")
    if env and Path(env).is_file():
        return Path(env)
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    for name in INCEPTION_WEIGHT_FILES:
        if (hub / name).is_file():
            return hub / name
    return None


def inception_fid_status() -> dict:
    """Standard FID is reported as skipped unless Inception weights already exist on this machine: they are
    not downloaded, and 32 px images upscaled to 299 px say little about these tiny datasets anyway."""
    weights = find_inception_weights()
    if weights is None:
        return {"computed": False, "reason": "no Inception weights on this machine (looked for "
                f"{', '.join(INCEPTION_WEIGHT_FILES)} in the torch hub cache and $MEGAFUSION_INCEPTION_WEIGHTS); "
                "nothing is downloaded"}
    return {"computed": False, "weights": str(weights),
            "reason": "Inception weights found, but standard FID is not wired in: use the in-domain feature FID"}
