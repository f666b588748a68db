"""The scikit-learn digits demo: fixed split, image format, captions that parse back to their labels."""

from __future__ import annotations

import pytest

from megafusion.data_pipeline.demo.digits import (
    DIGIT_CAPTION_TEMPLATES,
    DIGIT_WORDS,
    digit_from_caption,
    digits_samples,
)


@pytest.fixture(scope="module")
def splits():
    return {split: digits_samples(split) for split in ("train", "test")}


def test_split_sizes_fixed_and_disjoint(splits):
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test)) == (1437, 360)
    train_keys, test_keys = {s.key for s in train}, {s.key for s in test}
    assert len(train_keys) == len(train) and len(test_keys) == len(test)
    assert not train_keys & test_keys
    # The split is by source index (every 5th is test), so the underlying indices are disjoint too.
    assert not {k.rsplit("-", 1)[1] for k in train_keys} & {k.rsplit("-", 1)[1] for k in test_keys}
    assert test[0].key == "digits-test-000000" and train[0].key == "digits-train-000001"
    assert {s.label for s in test} == set(range(10))


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
    samples = splits["train"] + splits["test"]
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
