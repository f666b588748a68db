"""Raw image+caption samples from a source spec, in a deterministic order, plus the pixel <-> tensor helpers.

A spec is one of:

- `demo:digits`, `demo:shapes` -- the built-in datasets (the only sources with train/test splits),
- a `.jsonl` manifest, one `{"image": path relative to the manifest, "caption": ...}` per line,
- WebDataset tar shards: one `.tar`, a brace pattern (`data-{000..009}.tar`), or a directory holding `.tar` files,
- any other directory: images (jpg/jpeg/png/webp, searched recursively) with captions in same-named `.txt` files.

Contract for consumers:

- A sample without a caption is *yielded* with `caption=None` (it is still good VAE training data); the consumer
  decides whether to record it. Nothing else about a missing caption is logged here.
- Problems the source can see without decoding pixels (a bad manifest line, a corrupt or missing shard, a
  tar sample without an image, an unreadable caption file, a duplicate key) are recorded in the `SkipLog` and
  the sample is not yielded; iteration always continues with the next item.
- Images are decoded only by `RawSample.load_image()`, which raises `ImageLoadError` naming the key and file;
  the consumer records those.
- Keys are stable and unique within one source and never contain a dot, so they can be used as WebDataset
  `__key__`s directly (WebDataset splits member names at the first dot of the basename). They may contain `/`.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from .demo.common import check_split

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DEMO_SOURCES = ("digits", "shapes")


class ImageLoadError(RuntimeError):
    """An image could not be read or decoded; the message names the sample key and where it came from."""


@dataclass
class RawSample:
    key: str
    caption: str | None
    load_image: Callable[[], Image.Image]  # decodes on call (RGB); raises ImageLoadError


class SkipLog:
    """Items a source or its consumer dropped, with why; every entry is also logged as a warning."""

    def __init__(self) -> None:
        self.entries: list[dict] = []

    def record(self, key: str, reason: str) -> None:
        self.entries.append({"key": key, "reason": reason})
        logger.warning("skipped %s: %s", key, reason)

    def __len__(self) -> int:
        return len(self.entries)


# --- pixels -------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy; transparent pixels become white (dropping alpha would expose arbitrary, often black, colours)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """RGB, the largest centred square, resized to `resolution` x `resolution` with LANCZOS."""
    return ImageOps.fit(to_rgb(image), (resolution, resolution), method=Image.Resampling.LANCZOS)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1], the range diffusers VAEs expect."""
    array = np.asarray(to_rgb(image), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_image(t: torch.Tensor) -> Image.Image:
    """Inverse of `image_to_tensor` for a (3, H, W) or (1, 3, H, W) tensor; values outside [-1, 1] are clipped."""
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(t.shape)}")
    array = ((t.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), mode="RGB")


def _decoder(key: str, where: str, open_stream: Callable[[], BinaryIO]) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        try:
            with open_stream() as stream:
                image = Image.open(stream)
                image.load()
            return to_rgb(ImageOps.exif_transpose(image))
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            raise ImageLoadError(f"{key}: cannot read image {where}: {type(err).__name__}: {err}") from err

    return load


def _file_decoder(key: str, path: Path) -> Callable[[], Image.Image]:
    return _decoder(key, str(path), lambda: open(path, "rb"))


def _bytes_decoder(key: str, where: str, data: bytes) -> Callable[[], Image.Image]:
    return _decoder(key, where, lambda: io.BytesIO(data))


def _safe_key(key: str) -> str:
    return key.replace(".", "_")


# --- sources ------------------------------------------------------------------------------------------------


def iter_source(spec: str, skips: SkipLog, split: str = "train", resolution: int = 32) -> Iterator[RawSample]:
    """Samples of `spec` in a fixed order (see the module docstring for specs and the skip contract).

    `split` and `resolution` apply to demo sources only; every other source is one split, used as is (point the
    spec at a split's own folder/manifest/shards). Raises FileNotFoundError / ValueError at once for a spec that
    names nothing readable; everything below that level is recorded in `skips` instead.
    """
    return _unique(_dispatch(spec, skips, split, resolution), skips)


def _unique(samples: Iterator[RawSample], skips: SkipLog) -> Iterator[RawSample]:
    seen: set[str] = set()
    for sample in samples:
        if sample.key in seen:
            skips.record(sample.key, "duplicate key: an earlier sample of this source has the same key")
            continue
        seen.add(sample.key)
        yield sample


def is_demo(spec: str) -> bool:
    return spec.startswith("demo:")


def _dispatch(spec: str, skips: SkipLog, split: str, resolution: int) -> Iterator[RawSample]:
    if is_demo(spec):
        name = spec[len("demo:") :]
        if name not in DEMO_SOURCES:
            raise ValueError(f"source {spec}: unknown demo dataset (known: {', '.join(DEMO_SOURCES)})")
        check_split(split)
        return _iter_demo(name, split, resolution)
    if "{" in spec:
        import braceexpand  # a webdataset dependency; the same expansion WebDataset applies to its URLs

        return _iter_tars([Path(p) for p in braceexpand.braceexpand(spec)], skips)
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"source {spec}: no such file or directory")
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
        return _iter_tars(shards, skips) if shards else _iter_folder(path, skips)
    if path.suffix == ".jsonl":
        return _iter_manifest(path, skips)
    if path.suffix == ".tar":
        return _iter_tars([path], skips)
    raise ValueError(f"source {spec}: expected demo:NAME, a directory, a .jsonl manifest or .tar shard(s)")


def _iter_demo(name: str, split: str, resolution: int) -> Iterator[RawSample]:
    if name == "digits":
        from .demo.digits import digits_samples

        samples = digits_samples(split, resolution)
    else:
        from .demo.shapes import shapes_samples

        samples = shapes_samples(split, resolution)
    for s in samples:
        yield RawSample(s.key, s.caption, lambda image=s.image: image.copy())


def _read_caption_file(path: Path) -> str | None:
    text = path.read_text(encoding="utf-8").strip()
    return text or None


def _iter_folder(root: Path, skips: SkipLog) -> Iterator[RawSample]:
    def wanted(p: Path) -> bool:
        rel = p.relative_to(root).parts
        # Hidden files and folders (.ipynb_checkpoints, macOS ._ files) are tool debris, not data.
        return p.suffix.lower()[1:] in IMAGE_EXTENSIONS and not any(part.startswith(".") for part in rel)

    images = sorted((p for p in root.rglob("*") if wanted(p) and p.is_file()), key=lambda p: p.relative_to(root))
    for path in images:
        key = _safe_key(path.relative_to(root).with_suffix("").as_posix())
        caption_path = path.with_suffix(".txt")
        caption = None
        if caption_path.is_file():
            try:
                caption = _read_caption_file(caption_path)
            except (OSError, UnicodeDecodeError) as err:
                skips.record(key, f"unreadable caption file {caption_path}: {err}")
                continue
        yield RawSample(key, caption, _file_decoder(key, path))


def _caption_from(obj: dict) -> str | None:
    for field in ("caption", "text"):
        value = obj.get(field)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _iter_manifest(manifest: Path, skips: SkipLog) -> Iterator[RawSample]:
    """Keys are `<manifest stem>-<line number>`: a manifest may list one image under several captions."""
    base = manifest.parent
    with open(manifest, "rb") as lines:  # bytes: one badly encoded line is skipped, not the whole manifest
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{manifest}:{lineno}"
            try:
                obj = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                skips.record(where, f"bad JSON: {err}")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not obj["image"]:
                skips.record(where, 'line has no "image" path')
                continue
            key = _safe_key(f"{manifest.stem}-{lineno:06d}")
            yield RawSample(key, _caption_from(obj), _file_decoder(key, base / obj["image"]))


def _iter_tars(shards: list[Path], skips: SkipLog) -> Iterator[RawSample]:
    for shard in shards:
        if not shard.is_file():
            skips.record(str(shard), "missing tar shard")
            continue
        yield from _iter_tar(shard, skips)


def _tar_problem(shard: Path) -> str | None:
    """Why `shard` is not a complete tar archive, or None if it is; reads only the member headers.

    Python's tarfile (and so WebDataset, which streams through it) reads garbage where a header should be, or a
    cut at a member boundary, as a normal end of archive: it would silently drop the rest of the shard. Here the
    archive must end in its end-of-archive marker (zero blocks up to end of file) right after the last member.
    """
    import tarfile

    try:
        with tarfile.open(shard, mode="r:") as tar:
            tar.getmembers()
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as err:
        return f"corrupt or truncated tar: {type(err).__name__}: {err}"
    size = shard.stat().st_size
    with open(shard, "rb") as fh:
        fh.seek(end)
        while block := fh.read(1 << 20):
            if any(block):
                return f"corrupt tar: no valid member header at byte {end} of {size}"
    if size - end < 1024:
        return "truncated tar: no end-of-archive marker"
    return None


def _iter_tar(shard: Path, skips: SkipLog) -> Iterator[RawSample]:
    # WebDataset's own tar reader and key grouping (member "dir/000123.jpg" -> key "dir/000123", field "jpg").
    # A damaged shard is skipped whole: its samples near the damage may have lost members, and which ones is
    # unknowable. Its stages re-raise by default; catching that too (e.g. a shard changed while being read)
    # keeps one bad shard from stopping the others.
    problem = _tar_problem(shard)
    if problem is not None:
        skips.record(str(shard), f"{problem}; shard skipped")
        return
    from webdataset.tariterators import group_by_keys, tar_file_expander

    def duplicate_member(err: Exception) -> bool:
        skips.record(str(shard), f"{err.args[0] if err.args else err}")
        return True  # drop that member, keep reading the shard

    count = 0
    try:
        with open(shard, "rb") as stream:  # opened here so it is closed even when the consumer stops early
            files = tar_file_expander([{"url": str(shard), "stream": stream}])
            for sample in group_by_keys(files, handler=duplicate_member):
                count += 1
                raw = _tar_sample(shard, sample, skips)
                if raw is not None:
                    yield raw
    except Exception as err:
        reason = err.args[0] if err.args else err
        skips.record(str(shard), f"corrupt tar after {count} samples: {type(err).__name__}: {reason}")
        return
    if count == 0:
        skips.record(str(shard), "tar shard holds no samples")


def _tar_sample(shard: Path, sample: dict, skips: SkipLog) -> RawSample | None:
    key = _safe_key(sample["__key__"])
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_ext is None:
        fields = ", ".join(k for k in sample if not k.startswith("__")) or "nothing"
        skips.record(key, f"no image member in {shard} (has: {fields})")
        return None
    caption = None
    try:
        if "txt" in sample:
            caption = sample["txt"].decode("utf-8").strip() or None
        elif "json" in sample:
            obj = json.loads(sample["json"])
            caption = _caption_from(obj) if isinstance(obj, dict) else None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        skips.record(key, f"unreadable caption in {shard}: {err}")
        return None
    where = f"{shard}:{sample['__key__']}.{image_ext}"
    return RawSample(key, caption, _bytes_decoder(key, where, sample[image_ext]))
