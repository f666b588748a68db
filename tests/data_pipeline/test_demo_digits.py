"""The scikit-learn digits demo: fixed train/val/test split, image format, captions that parse back to their
labels, and the builtin:digits-pixels cache that is rebuilt when the split changes."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from megafusion.data_pipeline.demo import pixel_latents
from megafusion.data_pipeline.demo.common import split_fingerprint
from megafusion.data_pipeline.demo.digits import (
    DIGIT_CAPTION_TEMPLATES,
    DIGIT_WORDS,
    digit_from_caption,
    digits_samples,
    split_indices,
)


@pytest.fixture(scope="module")
def splits():
    return {split: digits_samples(split) for split in ("train", "val", "test")}


def test_split_sizes_fixed_and_disjoint(splits):
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert (len(train), len(val), len(test)) == (1237, 200, 360)
    keys = {name: {s.key for s in samples} for name, samples in splits.items()}
    assert all(len(keys[name]) == len(splits[name]) for name in splits)
    # Disjoint by source index too (the key's number), not only by the split name in the key.
    index = {name: {int(k.rsplit("-", 1)[1]) for k in keys[name]} for name in splits}
    assert not index["train"] & index["val"] and not index["train"] & index["test"] and not index["val"] & index["test"]
    assert index["train"] | index["val"] | index["test"] == set(range(1797))
    assert all(i % 5 == 0 for i in index["test"])  # test is unchanged by carving val out of train
    assert test[0].key == "digits-test-000000" and train[0].key == "digits-train-000001"
    assert {s.label for s in test} == set(range(10))


def test_val_is_class_balanced_and_spread_over_the_collection(splits):
    assert Counter(s.label for s in splits["val"]) == {d: 20 for d in range(10)}
    val = split_indices("val")
    assert val == sorted(val) and val[0] > 0 and val[-1] > 1700  # not just the first writers' digits


def test_split_fingerprint_names_the_split():
    assert split_fingerprint("digits", "train") == split_fingerprint("digits", "train")
    assert len({split_fingerprint("digits", s) for s in ("train", "val", "test")}) == 3
    assert split_fingerprint("shapes", "val") != split_fingerprint("shapes", "test")


def test_pixel_shards_of_another_split_are_rebuilt(tmp_path):
    out = pixel_latents.build_pixel_latent_shards(tmp_path / "px", "train", shard_size=512)
    index = json.loads((out / "index.json").read_text())
    assert index["num_samples"] == 1237 and index["num_shards"] == 3
    # A cache written before the val split existed: 1,437 samples in 12 shards, no content record.
    (out / "shard-000011.tar").write_bytes(b"old")
    old = {**index, "num_samples": 1437, "num_shards": 12}
    del old["content"]
    (out / "index.json").write_text(json.dumps(old))
    pixel_latents.build_pixel_latent_shards(out, "train", shard_size=512)
    rebuilt = json.loads((out / "index.json").read_text())
    assert rebuilt == index and not (out / "shard-000011.tar").exists()
    before = (out / "shard-000000.tar").stat().st_mtime_ns
    pixel_latents.build_pixel_latent_shards(out, "train", shard_size=512)  # current: reused, not rewritten
    assert (out / "shard-000000.tar").stat().st_mtime_ns == before


def test_deterministic_across_calls(splits):
    again = digits_samples("test")
    assert [(s.key, s.caption, s.label) for s in again] == [(s.key, s.caption, s.label) for s in splits["test"]]
    assert again[7].image.tobytes() == splits["test"][7].image.tobytes()


def test_images_are_rgb_at_resolution(splits):
    image = splits["train"][0].image
    assert image.mode == "RGB" and image.size == (32, 32)
    assert max(image.getextrema()[0]) > 200  # ink is bright on black
    assert digits_samples("test", resolution=16)[0].image.size == (16, 16)


def test_captions_parse_back_to_labels(splits):
    samples = splits["train"] + splits["val"] + splits["test"]
    assert all(digit_from_caption(s.caption) == s.label for s in samples)
    used = {
        next(t for t in DIGIT_CAPTION_TEMPLATES if t.format(d=s.label, word=DIGIT_WORDS[s.label]) == s.caption)
        for s in samples
    }
    assert used == set(DIGIT_CAPTION_TEMPLATES)  # every phrasing occurs


@pytest.mark.parametrize("template", DIGIT_CAPTION_TEMPLATES)
@pytest.mark.parametrize("digit", range(10))
def test_every_template_parses(template, digit):
    assert digit_from_caption(template.format(d=digit, word=DIGIT_WORDS[digit])) == digit


@pytest.mark.parametrize(
    ("caption", "expected"),
    [("The number Seven.", 7), ("A 3!", 3), ("a cat", None), ("3 or 4", None), ("someone", None), ("seven 7", 7)],
)
def test_free_text(caption, expected):
    assert digit_from_caption(caption) == expected


def test_bad_split():
    with pytest.raises(ValueError, match="split"):
        digits_samples("validation")
