"""The generation judges: the confidence rule, the two classifiers of different kinds on real and non-digit
images, confusion-matrix counts, and the per-split prompts and seeds."""

import numpy as np
import pytest
from PIL import Image

from megafusion.data_pipeline.demo.digits import DIGIT_CAPTION_TEMPLATES
from megafusion.eval.datasets import DIGITS, SHAPES, SPLIT_SEED_OFFSET, make_judges, train_in_domain_classifier
from megafusion.eval.judges import (
    REJECT,
    ClassifierJudge,
    confident_labels,
    confusion_matrix,
    hog_features,
    non_digit_images,
)

THRESHOLD = 0.7


class _Fixed:
    """A model that returns given probabilities, whatever the images."""

    def __init__(self, probs: list[list[float]], classes: list) -> None:
        self.probs, self.classes = np.asarray(probs), classes

    def probabilities(self, images):
        return self.probs


def _blob(size: int = 32) -> Image.Image:
    yy, xx = np.mgrid[:size, :size]
    a = 230 * np.exp(-((yy - 15) ** 2 + (xx - 17) ** 2) / (2 * 7.0**2))
    return Image.fromarray(a.astype(np.uint8), mode="L").convert("RGB")


@pytest.fixture(scope="module")
def judges():
    train = DIGITS.samples("train")
    classifier = train_in_domain_classifier(DIGITS, train, seed=0)
    return {j.name: j for j in make_judges(DIGITS, classifier, train, THRESHOLD, seed=0)}


@pytest.fixture(scope="module")
def test_digits():
    return DIGITS.samples("test")


def test_confidence_rule_needs_the_asked_class_above_threshold():
    classes = [REJECT, 3, 8]
    probs = [[0.1, 0.5, 0.4],    # argmax 3, not confident
             [0.05, 0.9, 0.05],  # confident 3
             [0.8, 0.15, 0.05],  # confidently not a digit
             [0.0, 0.3, 0.7]]    # exactly at the threshold: confident 8
    assert confident_labels(np.asarray(probs), classes, THRESHOLD) == [None, 3, None, 8]
    judge = ClassifierJudge("stub", "fixed", _Fixed(probs, classes), THRESHOLD)
    images = [Image.new("RGB", (32, 32))] * 4
    assert judge.verdicts(images, [3, 3, 3, 8], [""] * 4) == [False, True, False, True]
    with pytest.raises(ValueError, match="threshold"):
        confident_labels(np.asarray(probs), classes, 0.0)


@pytest.mark.parametrize("image", [Image.new("RGB", (32, 32), (128, 128, 128)), _blob()], ids=["grey", "blob"])
def test_blobs_are_not_counted_even_where_the_argmax_names_the_digit(judges, image):
    for judge in judges.values():
        probs = judge.model.probabilities([image])[0]
        digits = [i for i, c in enumerate(judge.model.classes) if c != REJECT]
        best_digit = judge.model.classes[max(digits, key=lambda i: probs[i])]
        # Asking for the digit this judge finds most likely in the blob: still not counted.
        assert judge.verdicts([image], [best_digit], [""]) == [False], (judge.name, probs.round(3))


def test_real_test_digits_pass_both_judges(judges, test_digits):
    images, labels = [s.image for s in test_digits], [s.label for s in test_digits]
    for judge in judges.values():
        accuracy = float(np.mean(judge.verdicts(images, labels, [""] * len(images))))
        assert accuracy >= 0.95, (judge.name, accuracy)


def test_second_judge_is_another_kind_of_model_on_other_features(judges):
    mlp, svm = judges["mlp"].model, judges["hog_svm"].model
    assert type(mlp.model).__name__ == "MLPClassifier"
    assert type(svm.model.estimator).__name__ == "SVC" and svm.model.estimator.kernel == "rbf"
    assert sorted(mlp.classes, key=str) == sorted(svm.classes, key=str) == sorted([REJECT, *range(10)], key=str)
    assert hog_features([Image.new("RGB", (32, 32), (90, 90, 90))]).max() == 0.0  # no strokes, no features
    assert hog_features([_blob()]).shape == (1, 4 * 4 * 9)


def test_non_digit_images_are_deterministic_grey_and_of_every_kind(test_digits):
    reals = [s.image for s in test_digits[:10]]
    a, b = non_digit_images(8, 5, reals), non_digit_images(8, 5, reals)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    assert all(im.mode == "RGB" and im.size == (32, 32) for im in a)
    assert np.ptp(np.asarray(a[0])) == 0 and np.ptp(np.asarray(a[1])) > 50  # a flat field, then blobs


def test_confusion_matrix_counts():
    asked = [0, 0, 0, 1, 1, 2]
    judged = [0, None, 1, 1, 1, None]
    assert confusion_matrix(asked, judged, [0, 1, 2]) == [[1, 1, 0, 1], [0, 2, 0, 0], [0, 0, 0, 1]]


def test_val_has_its_own_prompts_and_seed_and_out_of_template_is_no_training_caption():
    test, val = DIGITS.prompts(10, "test", False), DIGITS.prompts(10, "val", False)
    assert [p.label for p in test] == [p.label for p in val] == list(range(10))
    assert not {p.text for p in test} & {p.text for p in val}
    assert SPLIT_SEED_OFFSET["val"] != SPLIT_SEED_OFFSET["test"]
    for split in ("test", "val"):
        phrasing = DIGITS.prompt_phrasing(split, True)
        assert phrasing not in DIGIT_CAPTION_TEMPLATES
        assert [p.label for p in DIGITS.prompts(10, split, True)] == list(range(10))
    assert DIGITS.prompt_phrasing("test", True) != DIGITS.prompt_phrasing("val", True)
    shapes_val = SHAPES.prompts(4, "val", False)
    assert not {p.text for p in shapes_val} & {p.text for p in SHAPES.prompts(4, "test", False)}
    assert all(p.text.startswith("an image showing ") for p in SHAPES.prompts(4, "val", True))
    with pytest.raises(ValueError, match="split"):
        DIGITS.prompts(10, "train", False)  # generation is never scored on the training split
