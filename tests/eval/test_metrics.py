"""Evaluation metrics on tiny inputs with known answers: classifier accuracy, Frechet distance, CIDEr, caption
accuracy and the datasets' judging rules."""

import numpy as np
import pytest
from PIL import Image

from megafusion.data_pipeline.demo.shapes import Shape, caption_for, render
from megafusion.eval.captions import caption_accuracy, cider, simple_tokenize
from megafusion.eval.classifier import image_features, train_classifier
from megafusion.eval.datasets import DIGITS, SHAPES, Prompt, balanced_subset, get_dataset, make_judges
from megafusion.eval.fid import feature_fid, frechet_distance, gaussian_stats, inception_fid_status


def _half(top: bool, seed: int, size: int = 32) -> Image.Image:
    """A bright top (or bottom) half on black, with a little noise so no two images are equal."""
    a = np.random.default_rng(seed).integers(0, 40, (size, size)).astype(np.uint8)
    rows = slice(0, size // 2) if top else slice(size // 2, size)
    a[rows] = 255 - a[rows]
    return Image.fromarray(a).convert("RGB")


def test_classifier_separates_known_classes_and_exposes_hidden_features():
    train = [_half(top, seed) for top in (True, False) for seed in range(8)]
    labels = ["v" if top else "h" for top in (True, False) for _ in range(8)]
    clf = train_classifier(train, labels, mode="L", size=16, hidden=16)
    test = [_half(True, 100), _half(False, 101), _half(True, 102)]
    assert clf.predict(test) == ["v", "h", "v"]
    assert clf.accuracy(test, ["v", "h", "v"]) == 1.0
    assert clf.accuracy(test, ["v", "v", "h"]) == pytest.approx(1 / 3)
    assert clf.features(test).shape == (3, 16)
    assert (clf.features(test) >= 0).all()  # ReLU activations


def test_image_features_are_downsampled_pixels_in_unit_range():
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    red = Image.new("RGB", (32, 32), (255, 0, 0))
    grey = image_features([white], "L", 8)
    assert grey.shape == (1, 64) and np.allclose(grey, 1.0)
    rgb = image_features([red], "RGB", 4)
    assert rgb.shape == (1, 48) and np.allclose(rgb.reshape(4, 4, 3)[..., 0], 1.0)


def test_frechet_distance_closed_forms():
    d = 5
    mu = np.arange(d, dtype=float)
    assert frechet_distance(mu, np.eye(d), mu, np.eye(d)) == pytest.approx(0.0, abs=1e-9)
    # Equal covariances: only the means count, ||mu1 - mu2||^2.
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(mu, np.eye(d), mu + shift, np.eye(d)) == pytest.approx(float(shift @ shift))
    # Commuting (diagonal) covariances: sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0, 0.25, 2.0]), np.array([4.0, 1.0, 9.0, 1.0, 8.0])
    expected = float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(expected)


def test_feature_fid_of_samples():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 3))
    assert feature_fid(x, x) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([2.0, 0.0, -1.0])
    # The same samples shifted: equal covariances, means apart by exactly `shift` -> ||shift||^2 = 5.
    assert feature_fid(x, x + shift) == pytest.approx(5.0, rel=1e-6)
    # Scaled by c: sqrt(S * c^2 S) = c S, so the distance is (1 - c)^2 Tr(S).
    mean, cov = gaussian_stats(x)
    assert feature_fid(x, 3 * x) == pytest.approx(4 * np.trace(cov) + 4 * mean @ mean, rel=1e-6)
    # Fresh draws of N(shift, I): close to the population value 5.
    assert feature_fid(x, rng.standard_normal((4000, 3)) + shift) == pytest.approx(5.0, abs=0.4)
    assert mean.shape == (3,) and cov.shape == (3, 3)
    with pytest.raises(ValueError):
        gaussian_stats(x[:1])


def test_frechet_distance_survives_fewer_samples_than_dimensions():
    rng = np.random.default_rng(1)
    value = feature_fid(rng.standard_normal((8, 20)), rng.standard_normal((8, 20)))
    assert np.isfinite(value) and value > 0


def test_inception_fid_is_skipped_without_local_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("MEGAFUSION_INCEPTION_WEIGHTS", raising=False)
    status = inception_fid_status()
    assert status["computed"] is False and "nothing is downloaded" in status["reason"]


def test_cider_identical_captions_score_ten_and_disjoint_ones_zero():
    refs = {"a": ["a red circle on the left"], "b": ["a blue square at the top"],
            "c": ["two green triangles in the center"]}
    score, per_item = cider(refs, {k: v[0] for k, v in refs.items()})
    assert score == pytest.approx(10.0) and per_item == pytest.approx([10.0, 10.0, 10.0])
    score, per_item = cider(refs, {"a": "A red circle on the left.", "b": "a blue square at the top",
                                   "c": "nothing at all here"})
    assert per_item[0] == pytest.approx(10.0)  # case and punctuation do not matter
    assert per_item[2] == 0.0 and score == pytest.approx(20.0 / 3)
    with pytest.raises(ValueError):
        cider(refs, {"a": "x"})


def test_simple_tokenize():
    assert simple_tokenize("  The Number SEVEN, written by hand! ") == "the number seven written by hand"


def test_caption_accuracy_for_digits():
    samples = {s.label: s for s in DIGITS.samples("test")}
    seven, three = samples[7], samples[3]
    captions = ["The number Seven.", "a handwritten 7", "a handwritten digit 3", "1 or 7", ""]
    truths = [seven, seven, seven, seven, three]
    accuracy, verdicts = caption_accuracy(captions, truths, DIGITS.caption_correct)
    assert verdicts == [True, True, False, False, False]
    assert accuracy == pytest.approx(0.4)


def test_caption_accuracy_for_shapes():
    sample = next(s for s in SHAPES.samples("test")[:50] if len(s.label["shapes"]) == 2)
    left, right = sample.caption.split(" and ")
    assert SHAPES.caption_correct(sample.caption, sample)
    assert SHAPES.caption_correct(f"{right} and {left}", sample)  # either order names the same layout
    assert not SHAPES.caption_correct(left, sample)
    assert set(SHAPES.caption_references(sample)) == {sample.caption, f"{right} and {left}"}


def test_digit_references_cover_every_template():
    sample = next(s for s in DIGITS.samples("test") if s.label == 4)
    refs = DIGITS.caption_references(sample)
    assert len(refs) == 7 and "the number four" in refs and "a handwritten digit 4" in refs


def test_shapes_are_judged_by_the_rule_checker():
    shapes = [Shape("red", "square", "left"), Shape("blue", "circle", "right")]
    image = render(shapes, 32)
    good, bad = Prompt(caption_for(shapes), "red square"), Prompt("a green triangle at the top", "green triangle")
    (judge,) = make_judges(SHAPES, None, [], threshold=0.7)
    assert judge.verdicts([image, image], [good.label, bad.label], [good.text, bad.text]) == [True, False]
    assert judge.verdicts([image], [good.label], ["a picture of " + good.text]) == [True]  # out-of-template


def test_prompts_and_balanced_subset():
    digits = DIGITS.prompts(99)
    assert [p.label for p in digits] == list(range(10))
    shapes = SHAPES.prompts(6)
    assert len(shapes) == 6 and len({p.text for p in shapes}) == 6
    subset = balanced_subset(DIGITS, DIGITS.samples("test"), 20)
    assert sorted(s.label for s in subset) == sorted(list(range(10)) * 2)
    with pytest.raises(ValueError):
        get_dataset("mnist")
