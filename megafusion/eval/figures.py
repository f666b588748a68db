"""PNG figures of an evaluation: generated images per prompt, confusion matrices of the judges, and held-out
images with their captions.

matplotlib with the Agg backend: no display is needed, and nothing else in the process is affected."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from PIL import Image


def _save(plt: ModuleType, fig: Any, path: Path) -> Path:
    """Lays out, writes (creating the folder) and closes a figure; every figure here is saved the same way."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def prompt_grid(images: Sequence[Image.Image], path: Path, scale: int = 2) -> Path:
    """One prompt's images side by side, upscaled (nearest) so 32 px images stay visible."""
    from megafusion.inference.images import image_grid

    big = [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for im in images]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(big, cols=len(big)).save(path)
    return path


def _frame_colour(agreement: float) -> str:
    if agreement >= 1.0:
        return "tab:green"
    return "tab:orange" if agreement > 0.0 else "tab:red"


def generation_overview(rows: Sequence[tuple[str, Sequence[Image.Image], Sequence[float]]], path: Path) -> Path:
    """Rows of (prompt, images, agreement): per image the share of judges calling it correct, shown as its frame
    (green: every judge, orange: some, red: none)."""
    plt = _pyplot()
    cols = max(len(images) for _, images, _ in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.0 * cols + 2.6, 1.05 * len(rows)), squeeze=False)
    for r, (prompt, images, verdicts) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.axis("off")
                continue
            ax.imshow(images[c])
            for spine in ax.spines.values():
                spine.set_edgecolor(_frame_colour(float(verdicts[c])))
                spine.set_linewidth(2)
        axes[r][0].set_ylabel(prompt, rotation=0, ha="right", va="center", fontsize=7, wrap=True)
    fig.suptitle("generated images (frame: green = every judge confidently sees the asked class, orange = some, "
                 "red = none)", fontsize=9)
    return _save(plt, fig, path)


def caption_sheet(items: Sequence[tuple[Image.Image, str, bool]], path: Path, cols: int = 6) -> Path:
    """Held-out images, each titled with its generated caption (green: correct, red: wrong)."""
    plt = _pyplot()
    rows = (len(items) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(items):
            continue
        image, caption, ok = items[i]
        ax.imshow(image)
        ax.set_title(caption if len(caption) <= 60 else caption[:57] + "...", fontsize=7, wrap=True,
                     color="tab:green" if ok else "tab:red")
    fig.suptitle("held-out images with generated captions", fontsize=9)
    return _save(plt, fig, path)


def confusion_grid(panels: Sequence[tuple[str, Mapping[str, Sequence[Sequence[int]]]]], rows: Sequence[str],
                   judges: Mapping[str, str], path: Path) -> Path:
    """One confusion matrix per (judge, panel): asked class (rows) x judged class, the last column counting
    images no class was confidently named for. Colour is the share of the row; each cell prints its count."""
    import numpy as np

    plt = _pyplot()
    names = [n for n in judges if all(n in matrices for _, matrices in panels)]
    cols = [*rows, "?"]
    fig, axes = plt.subplots(len(names), len(panels), figsize=(3.3 * len(panels), 3.4 * len(names) + 0.6),
                             squeeze=False)
    for r, name in enumerate(names):
        for c, (title, matrices) in enumerate(panels):
            counts = np.asarray(matrices[name], dtype=float)
            share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
            ax = axes[r][c]
            ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
            for i in range(counts.shape[0]):
                for j in range(counts.shape[1]):
                    if counts[i, j]:
                        ax.text(j, i, f"{counts[i, j]:.0f}", ha="center", va="center", fontsize=6,
                                color="white" if share[i, j] > 0.5 else "black")
            ax.set_xticks(range(len(cols)), cols, fontsize=6)
            ax.set_yticks(range(len(rows)), rows, fontsize=6)
            ax.set_title(f"{name}: {title}", fontsize=8)
            if r == len(names) - 1:
                ax.set_xlabel("judged (? = not confident / not a digit)", fontsize=7)
            if c == 0:
                ax.set_ylabel("asked", fontsize=7)
    fig.suptitle("generated images: asked class x class the judge confidently sees", fontsize=9)
    return _save(plt, fig, path)
