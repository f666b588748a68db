"""Source enumeration (demo, folder, JSONL manifest, WebDataset tars), skip recording, and pixel helpers."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from megafusion.data_pipeline.sources import (
    ImageLoadError,
    RawSample,
    SkipLog,
    center_crop_resize,
    image_to_tensor,
    iter_source,
    tensor_to_image,
)


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _jpg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _shard(path: Path, start: int, n: int = 3) -> Path:
    members = []
    for i in range(start, start + n):
        members += [(f"{i:06d}.png", _png((i * 20 % 256, 0, 0))), (f"{i:06d}.txt", f"caption {i}".encode())]
    return _write_tar(path, members)


def _collect(spec: str, **kw) -> tuple[list[RawSample], SkipLog]:
    skips = SkipLog()
    return list(iter_source(spec, skips, **kw)), skips


# --- demo ---------------------------------------------------------------------------------------------------


def test_demo_digits_split_and_resolution():
    train, skips = _collect("demo:digits")
    test, _ = _collect("demo:digits", split="test", resolution=16)
    val, _ = _collect("demo:digits", split="val")
    assert (len(train), len(val), len(test), len(skips)) == (1237, 200, 360, 0)
    assert train[0].key == "digits-train-000001" and test[0].caption
    assert test[0].load_image().size == (16, 16)


def test_demo_shapes_and_unknown_demo():
    test, _ = _collect("demo:shapes", split="test")
    assert len(test) == 256 and test[0].key == "shapes-test-000000"
    with pytest.raises(ValueError, match="demo:nope"):
        iter_source("demo:nope", SkipLog())  # raised at the call, before iteration
    with pytest.raises(ValueError, match="split"):
        iter_source("demo:shapes", SkipLog(), split="validation")


# --- folder -------------------------------------------------------------------------------------------------


def test_folder_recursive_sorted_with_captions(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "a.txt").write_text("  a red thing\n")
    (tmp_path / "b" / "c.JPG").write_bytes(_jpg((0, 255, 0)))
    (tmp_path / "b" / "c.txt").write_text("green")
    (tmp_path / "b" / "d.v2.webp").write_bytes(_png((0, 0, 255)))  # webp ext, PNG bytes: PIL sniffs the content
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.png").write_bytes(_png((0, 0, 0)))

    samples, skips = _collect(str(tmp_path))
    assert [(s.key, s.caption) for s in samples] == [("a", "a red thing"), ("b/c", "green"), ("b/d_v2", None)]
    assert len(skips) == 0  # a missing caption is yielded as None, not recorded
    assert samples[0].load_image().getpixel((0, 0)) == (255, 0, 0)
    assert samples[2].load_image().mode == "RGB"


def test_folder_duplicate_stem_is_recorded(tmp_path):
    (tmp_path / "a.png").write_bytes(_png((1, 2, 3)))
    (tmp_path / "a.jpg").write_bytes(_jpg((1, 2, 3)))
    samples, skips = _collect(str(tmp_path))
    assert [s.key for s in samples] == ["a"]
    assert skips.entries == [{"key": "a", "reason": skips.entries[0]["reason"]}]
    assert "duplicate" in skips.entries[0]["reason"]


def test_corrupt_image_raises_naming_the_key(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (sample,), _ = _collect(str(tmp_path))
    with pytest.raises(ImageLoadError, match=r"broken.*broken\.png"):
        sample.load_image()


# --- manifest -----------------------------------------------------------------------------------------------


def test_jsonl_manifest(tmp_path, caplog):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(_png((10, 20, 30)))
    lines = [
        json.dumps({"image": "img/x.png", "caption": "first"}),
        "",
        "{not json",
        json.dumps({"image": "img/x.png", "caption": "same image, second caption"}),
        json.dumps({"caption": "no image"}),
        json.dumps({"image": "img/missing.png", "text": "via text"}),
        json.dumps({"image": "img/x.png"}),
    ]
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_bytes(("\n".join(lines) + "\n").encode() + b'{"image": "img/x.png", "caption": "\xff"}\n')

    with caplog.at_level(logging.WARNING):
        samples, skips = _collect(str(manifest))
    assert [(s.key, s.caption) for s in samples] == [
        ("pairs-000001", "first"),
        ("pairs-000004", "same image, second caption"),
        ("pairs-000006", "via text"),
        ("pairs-000007", None),
    ]
    assert [e["key"] for e in skips.entries] == [f"{manifest}:3", f"{manifest}:5", f"{manifest}:8"]
    assert "bad JSON" in skips.entries[0]["reason"]
    assert f"{manifest}:3" in caplog.text  # the skip is also logged, naming the item
    assert samples[0].load_image().getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(ImageLoadError, match="pairs-000006"):
        samples[2].load_image()


# --- tar shards ---------------------------------------------------------------------------------------------


def test_single_tar_with_txt_and_json_captions(tmp_path):
    tar = _write_tar(
        tmp_path / "one.tar",
        [
            ("s/0001.jpg", _jpg((200, 0, 0))),
            ("s/0001.txt", b"from txt"),
            ("s/0002.png", _png((0, 200, 0))),
            ("s/0002.json", json.dumps({"caption": "from json", "width": 8}).encode()),
            ("s/0003.png", _png((0, 0, 200))),
            ("s/0003.json", json.dumps({"text": "from text key"}).encode()),
            ("s/0004.webp", _png((9, 9, 9))),
            ("s/0005.txt", b"caption without an image"),
        ],
    )
    samples, skips = _collect(str(tar))
    assert [(s.key, s.caption) for s in samples] == [
        ("s/0001", "from txt"),
        ("s/0002", "from json"),
        ("s/0003", "from text key"),
        ("s/0004", None),
    ]
    assert [e["key"] for e in skips.entries] == ["s/0005"]
    assert samples[1].load_image().getpixel((0, 0)) == (0, 200, 0)


def test_brace_pattern_and_directory_of_shards(tmp_path):
    for k in range(3):
        _shard(tmp_path / f"data-{k:03d}.tar", start=10 * k)
    expected = [f"{i:06d}" for k in range(3) for i in range(10 * k, 10 * k + 3)]
    by_brace, _ = _collect(str(tmp_path / "data-{000..002}.tar"))
    by_dir, _ = _collect(str(tmp_path))
    assert [s.key for s in by_brace] == [s.key for s in by_dir] == expected
    assert by_dir[4].caption == "caption 11"


def test_corrupt_and_missing_shards_are_recorded_others_arrive(tmp_path):
    _shard(tmp_path / "data-000.tar", start=0)
    (tmp_path / "data-001.tar").write_bytes(b"this is not a tar archive\n" * 40)
    good = _shard(tmp_path / "data-002.tar", start=20, n=6).read_bytes()
    (tmp_path / "data-002.tar").write_bytes(good[: len(good) // 2])  # truncated (here at a member boundary)
    _shard(tmp_path / "data-003.tar", start=30)
    (tmp_path / "data-004.tar").write_bytes(b"")
    cut = _shard(tmp_path / "data-006.tar", start=60, n=6).read_bytes()
    (tmp_path / "data-006.tar").write_bytes(cut[: len(cut) // 2 + 700])  # truncated inside a member

    samples, skips = _collect(str(tmp_path / "data-{000..006}.tar"))
    assert [s.key for s in samples] == [f"{i:06d}" for i in (0, 1, 2, 30, 31, 32)]
    recorded = {Path(e["key"]).name: e["reason"] for e in skips.entries}
    assert set(recorded) == {"data-001.tar", "data-002.tar", "data-004.tar", "data-005.tar", "data-006.tar"}
    assert "truncated" in recorded["data-002.tar"] and "truncated" in recorded["data-006.tar"]
    assert "missing" in recorded["data-005.tar"] and "skipped" in recorded["data-001.tar"]
    assert all(s.load_image().size == (12, 10) for s in samples)


def test_damaged_header_inside_a_shard_skips_that_shard(tmp_path):
    # tarfile alone would read the garbage as end-of-archive and silently drop the rest of the shard.
    shard = _shard(tmp_path / "data-000.tar", start=0, n=4)
    data = bytearray(shard.read_bytes())
    third_header = data.index(b"000002.png")
    data[third_header : third_header + 512] = b"\x07" * 512
    shard.write_bytes(bytes(data))
    _shard(tmp_path / "data-001.tar", start=10, n=2)

    samples, skips = _collect(str(tmp_path))
    assert [s.key for s in samples] == ["000010", "000011"]
    assert [Path(e["key"]).name for e in skips.entries] == ["data-000.tar"]
    assert "corrupt tar: no valid member header" in skips.entries[0]["reason"]


def test_corrupt_image_inside_tar(tmp_path):
    tar = _write_tar(tmp_path / "bad.tar", [("k1.jpg", b"\xff\xd8not really a jpeg"), ("k1.txt", b"c")])
    (sample,), skips = _collect(str(tar))
    assert len(skips) == 0
    with pytest.raises(ImageLoadError, match=r"k1.*bad\.tar"):
        sample.load_image()


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        iter_source(str(tmp_path / "nowhere"), SkipLog())
    (tmp_path / "file.csv").write_text("a,b")
    with pytest.raises(ValueError, match="file.csv"):
        iter_source(str(tmp_path / "file.csv"), SkipLog())


# --- pixels -------------------------------------------------------------------------------------------------


def test_center_crop_resize():
    wide = Image.new("RGB", (60, 20), (0, 0, 255))
    wide.paste((255, 0, 0), (20, 0, 40, 20))  # red middle third: the centre crop keeps only it
    out = center_crop_resize(wide, 8)
    assert out.size == (8, 8) and out.mode == "RGB"
    # LANCZOS reads a little past the crop box, so the outermost columns pick up a trace of blue.
    pixels = np.asarray(out)
    assert (pixels[..., 0] >= 230).all() and (pixels[..., 2] <= 25).all()
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert center_crop_resize(rgba, 4).getpixel((0, 0)) == (255, 255, 255)  # transparency -> white
    assert center_crop_resize(Image.new("L", (5, 9), 128), 3).mode == "RGB"


def test_tensor_roundtrip():
    image = Image.frombytes("RGB", (4, 3), bytes(range(0, 256, 7))[:36])
    t = image_to_tensor(image)
    assert t.shape == (3, 3, 4) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    assert image_to_tensor(Image.new("RGB", (1, 1), (0, 255, 0))).flatten().tolist() == [-1.0, 1.0, -1.0]
    assert tensor_to_image(t).tobytes() == image.tobytes()
    assert tensor_to_image(t[None] * 3).getpixel((3, 2)) == (255, 255, 255)  # batched, clipped
    assert tensor_to_image(t * 3).getpixel((0, 0)) == (0, 0, 0)
    with pytest.raises(ValueError, match="shape"):
        tensor_to_image(torch.zeros(2, 3, 3))
