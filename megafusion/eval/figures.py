"""PNG figures of an evaluation: generated images per prompt and held-out images with their captions.

matplotlib with the Agg backend: no display is needed, and nothing else in the process is affected."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from PIL import Image


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


def generation_overview(rows: Sequence[tuple[str, Sequence[Image.Image], Sequence[bool]]], path: Path) -> Path:
    """Rows of (prompt, images, verdicts); a green or red frame shows each image's verdict."""
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
                spine.set_edgecolor("tab:green" if verdicts[c] else "tab:red")
                spine.set_linewidth(2)
        axes[r][0].set_ylabel(prompt, rotation=0, ha="right", va="center", fontsize=7, wrap=True)
    fig.suptitle("generated images (green frame: judged correct)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
