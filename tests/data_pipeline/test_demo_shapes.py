"""The generated shapes demo: captions say what is where, and the rule checker reads it back exactly."""

from __future__ import annotations

import random

import pytest
from PIL import Image

from megafusion.data_pipeline.demo.shapes import (
    COLOURS,
    Shape,
    caption_for,
    check_image,
    describe_image,
    parse_caption,
    render,
    shapes_samples,
)


@pytest.fixture(scope="module")
def samples():
    return shapes_samples("test", num_samples=200)


def test_checker_exact_on_generated_images(samples):
    assert all(check_image(s.image, s.caption) for s in samples)
    assert {len(s.label["shapes"]) for s in samples} == {1, 2}


@pytest.mark.parametrize("resolution", [16, 64])
def test_checker_exact_at_other_resolutions(resolution):
    assert all(check_image(s.image, s.caption) for s in shapes_samples("train", resolution, num_samples=100))


def test_splits_are_seeded_and_disjoint(samples):
    train = shapes_samples("train", num_samples=200)
    val = shapes_samples("val", num_samples=200)
    assert not {s.image.tobytes() for s in train} & {s.image.tobytes() for s in samples}
    assert not {s.image.tobytes() for s in val} & {s.image.tobytes() for s in samples + train}
    assert val[0].key == "shapes-val-000000"
    # Prefix-stable: more samples never change the earlier ones.
    more = shapes_samples("test", num_samples=250)
    assert [(s.key, s.caption, s.image.tobytes()) for s in more[:200]] == [
        (s.key, s.caption, s.image.tobytes()) for s in samples
    ]
    assert samples[0].key == "shapes-test-000000" and samples[0].image.size == (32, 32)


def _swap(shapes, field, values, rng):
    i = rng.randrange(len(shapes))
    old = getattr(shapes[i], field)
    new = rng.choice([v for v in values if v != old])
    return [s._replace(**{field: new}) if j == i else s for j, s in enumerate(shapes)]


@pytest.mark.parametrize(
    ("field", "values"),
    [("colour", list(COLOURS)), ("shape", ["circle", "square", "triangle"])],
)
def test_rejects_changed_attribute(samples, field, values):
    rng = random.Random(0)
    for s in samples:
        wrong = _swap(parse_caption(s.caption), field, values, rng)
        assert not check_image(s.image, caption_for(wrong)), (s.caption, caption_for(wrong))


def test_rejects_swapped_positions_and_colours(samples):
    pairs = [s for s in samples if len(s.label["shapes"]) == 2]
    checked = 0
    for s in pairs:
        a, b = parse_caption(s.caption)
        if a.colour != b.colour:
            swapped_colours = [a._replace(colour=b.colour), b._replace(colour=a.colour)]
            assert not check_image(s.image, caption_for(swapped_colours))
            checked += 1
        if (a.colour, a.shape) != (b.colour, b.shape):
            swapped_positions = [a._replace(position=b.position), b._replace(position=a.position)]
            assert not check_image(s.image, caption_for(swapped_positions))
    assert checked > 50


def test_rejects_missing_or_extra_shapes(samples):
    one = next(s for s in samples if len(s.label["shapes"]) == 1)
    two = next(s for s in samples if len(s.label["shapes"]) == 2)
    assert not check_image(two.image, caption_for(parse_caption(two.caption)[:1]))
    assert not check_image(one.image, one.caption + " and a red circle on the right")
    assert not check_image(Image.new("RGB", (32, 32), (245, 245, 245)), one.caption)
    assert not check_image(one.image, "a picture")


def test_another_samples_image_is_rejected(samples):
    def content(s):
        return sorted(map(str, s.label["shapes"]))

    mismatched = [(a, b) for a, b in zip(samples[:-1], samples[1:], strict=True) if content(a) != content(b)]
    assert len(mismatched) > 150
    assert all(not check_image(a.image, b.caption) for a, b in mismatched)


def test_parse_caption():
    assert parse_caption("a red circle on the left and a blue square on the right") == [
        Shape("red", "circle", "left"),
        Shape("blue", "square", "right"),
    ]
    assert parse_caption("A Yellow triangle in the centre.") == [Shape("yellow", "triangle", "center")]
    assert parse_caption("a red circle") is None  # no position
    assert parse_caption("a red circle on the left and a square") is None  # a shape it does not describe


def test_describe_render_roundtrip():
    shapes = [Shape("green", "triangle", "top"), Shape("red", "square", "bottom")]
    assert describe_image(render(shapes, 32, random.Random(3))) == shapes
