"""Tiny batch layouts for the kernel tests: per-token document and image ids built from readable segment lists."""

from __future__ import annotations

import torch

# A row is a list of segments: ("t", n) n text tokens, ("i", n) one image of n tokens, ("doc",) a new document.
Row = list[tuple]

LAYOUTS: dict[str, list[Row]] = {
    # Lengths deliberately not multiples of the 16-token test tile.
    "text-image-text": [[("t", 7), ("i", 20), ("t", 10)]],
    "several-images": [[("t", 3), ("i", 12), ("i", 12), ("t", 5), ("i", 12), ("t", 2)]],
    "image-first": [[("i", 20), ("t", 13)]],
    "packed-documents": [
        [("t", 5), ("i", 12), ("t", 4), ("doc",), ("t", 6), ("i", 12), ("t", 3), ("doc",), ("i", 8), ("t", 5)],
    ],
    "text-only": [[("t", 45)]],
    "two-rows": [
        [("t", 4), ("i", 16), ("t", 4), ("doc",), ("i", 16), ("t", 7)],
        [("i", 16), ("t", 16), ("doc",), ("t", 6), ("i", 9)],
    ],
}


def layout_ids(rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """(doc ids, image ids), each (B, S); images are numbered in row-major order, text is -1."""
    docs, imgs, next_image = [], [], 0
    for row in rows:
        doc, img, d = [], [], 0
        for seg in row:
            if seg[0] == "doc":
                d += 1
            elif seg[0] == "t":
                doc += [d] * seg[1]
                img += [-1] * seg[1]
            else:
                doc += [d] * seg[1]
                img += [next_image] * seg[1]
                next_image += 1
        docs.append(doc)
        imgs.append(img)
    if len({len(d) for d in docs}) != 1:
        raise ValueError(f"rows have different lengths: {[len(d) for d in docs]}")
    return torch.tensor(docs), torch.tensor(imgs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the tolerance the issue asks for (< 1e-4)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
