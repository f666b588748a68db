"""What the evaluation needs to know about each demo dataset: its real images, the prompts to generate from,
how a generated image is judged against its prompt, and how a caption is judged against the truth.

Prompts and generation seeds differ per evaluated split: settings are chosen on `val` with its own phrasings
and seeds, so the `test` numbers in the report come from prompts and noise no choice has seen. Each split also
has an out-of-template phrasing (never a training caption) to see whether the model follows the meaning or
only the memorised wording."""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from PIL import Image

from megafusion.data_pipeline.demo.common import DemoSample
from megafusion.data_pipeline.demo.digits import DIGIT_CAPTION_TEMPLATES, DIGIT_WORDS, digit_from_caption
from megafusion.data_pipeline.demo.shapes import POSITIONS, Shape, check_image, parse_caption
from megafusion.eval.classifier import ImageClassifier

DATASETS = ("digits", "shapes")
EVAL_SPLITS = ("val", "test")
# Added to EvalSettings.seed for generation: val never samples the noise test does.
SPLIT_SEED_OFFSET = {"test": 0, "val": 10_007}
# In-domain classifier training: this many generated non-digits form its "not a digit" class (about one class's
# worth of the 1,237 train digits).
NUM_REJECT_IMAGES = 200


@dataclass
class Prompt:
    text: str
    # The class the in-domain classifier should see in an image generated from this prompt.
    label: Hashable


@dataclass
class DatasetSpec:
    name: str
    # Pixel mode of the in-domain classifier: colour carries no information for digits, all of it for shapes.
    classifier_mode: str
    class_label: Callable[[DemoSample], Hashable]
    # (count, split, out_of_template) -> prompts; see the module docstring.
    prompts: Callable[[int, str, bool], list[Prompt]]
    # The phrasing of prompts(.., split, out_of_template), for the report.
    prompt_phrasing: Callable[[str, bool], str]
    # Exact rule check of a generated image, where the dataset has one (shapes); else the classifier decides.
    rule_check: Callable[[Image.Image, str], bool] | None
    caption_correct: Callable[[str, DemoSample], bool]
    caption_references: Callable[[DemoSample], list[str]]

    @property
    def source(self) -> str:
        return f"demo:{self.name}"

    @property
    def has_class_prompts(self) -> bool:
        """True when every prompt asks for one class the classifiers know (digits), so they can judge it."""
        return self.rule_check is None

    def samples(self, split: str, resolution: int = 32) -> list[DemoSample]:
        if self.name == "digits":
            from megafusion.data_pipeline.demo.digits import digits_samples

            return digits_samples(split, resolution)
        from megafusion.data_pipeline.demo.shapes import shapes_samples

        return shapes_samples(split, resolution)



# --- digits -------------------------------------------------------------------------------------------------


# split -> (a training template, a phrasing no training caption uses). Test keeps the most literal template, the
# one the earlier reports used; val uses another one.
DIGIT_PROMPT_TEMPLATES = {
    "test": (DIGIT_CAPTION_TEMPLATES[0], "a handwritten figure showing the number {word}"),
    "val": (DIGIT_CAPTION_TEMPLATES[5], "a picture of the handwritten numeral {d}"),
}


def _digit_phrasing(split: str, out_of_template: bool) -> str:
    if split not in DIGIT_PROMPT_TEMPLATES:
        raise ValueError(f"split: must be one of {EVAL_SPLITS}, got {split!r}")
    return DIGIT_PROMPT_TEMPLATES[split][int(out_of_template)]


def _digit_prompts(count: int, split: str = "test", out_of_template: bool = False) -> list[Prompt]:
    # One prompt per digit; `count` is ignored (always the 10 classes).
    template = _digit_phrasing(split, out_of_template)
    return [Prompt(template.format(d=d, word=DIGIT_WORDS[d]), d) for d in range(10)]


def _digit_references(sample: DemoSample) -> list[str]:
    # Every training template is an equally right caption: a single reference would punish a correct caption
    # for picking another template.
    d = int(sample.label)
    return [t.format(d=d, word=DIGIT_WORDS[d]) for t in DIGIT_CAPTION_TEMPLATES]


DIGITS = DatasetSpec(
    name="digits",
    classifier_mode="L",
    class_label=lambda s: int(s.label),
    prompts=_digit_prompts,
    prompt_phrasing=_digit_phrasing,
    rule_check=None,
    caption_correct=lambda caption, s: digit_from_caption(caption) == int(s.label),
    caption_references=_digit_references,
)

# --- shapes -------------------------------------------------------------------------------------------------


def _shapes_of(sample: DemoSample) -> list[Shape]:
    return [Shape(**d) for d in sample.label["shapes"]]


def _shape_class(sample: DemoSample) -> str:
    # 12 classes: colour + kind of the first shape in reading order (left, right, top, bottom, center), which the
    # picture determines (caption order does not: pairs are named either way). Enough for a feature space that
    # notices wrong colours and shapes; exact judging of layouts is `check_image`'s job.
    order = list(POSITIONS)
    first = min(_shapes_of(sample), key=lambda s: order.index(s.position))
    return f"{first.colour} {first.shape}"


# Out-of-template shapes prompts: the exact caption after a lead-in no training caption has (the rule checker
# reads the shapes from anywhere in the text).
SHAPE_LEAD_INS = {"test": "a picture of ", "val": "an image showing "}


def _shape_phrasing(split: str, out_of_template: bool) -> str:
    if split not in SHAPE_LEAD_INS:
        raise ValueError(f"split: must be one of {EVAL_SPLITS}, got {split!r}")
    return f"{SHAPE_LEAD_INS[split] if out_of_template else ''}<a {split} caption>"


def _shape_prompts(count: int, split: str = "test", out_of_template: bool = False) -> list[Prompt]:
    """`count` distinct captions of `split`, picked by a fixed hash order so single and paired layouts mix."""
    from megafusion.data_pipeline.demo.shapes import shapes_samples

    _shape_phrasing(split, out_of_template)  # checks the split
    lead = SHAPE_LEAD_INS[split] if out_of_template else ""
    # Few distinct layouts exist, so val's captions could be test's: val skips the ones test asks for.
    taken = {p.text for p in _shape_prompts(count, "test")} if split == "val" else set()
    samples = sorted(shapes_samples(split, 16), key=lambda s: zlib.crc32(s.caption.encode()))
    prompts: dict[str, Prompt] = {}
    for s in samples:
        if s.caption not in taken:
            prompts.setdefault(s.caption, Prompt(lead + s.caption, _shape_class(s)))
        if len(prompts) == count:
            break
    return list(prompts.values())


def _shapes_caption_correct(caption: str, sample: DemoSample) -> bool:
    parsed = parse_caption(caption)
    return parsed is not None and Counter(parsed) == Counter(_shapes_of(sample))


def _shape_references(sample: DemoSample) -> list[str]:
    # A pair may be named in either order ("... left and ... right" or "... right and ... left").
    parts = sample.caption.split(" and ")
    return [sample.caption] + ([" and ".join(reversed(parts))] if len(parts) == 2 else [])


SHAPES = DatasetSpec(
    name="shapes",
    classifier_mode="RGB",
    class_label=_shape_class,
    prompts=_shape_prompts,
    prompt_phrasing=_shape_phrasing,
    rule_check=check_image,
    caption_correct=_shapes_caption_correct,
    caption_references=_shape_references,
)


def get_dataset(name: str) -> DatasetSpec:
    specs = {"digits": DIGITS, "shapes": SHAPES}
    if name not in specs:
        raise ValueError(f"dataset: must be one of {DATASETS}, got {name!r}")
    return specs[name]


def _training_set(spec: DatasetSpec, train: list[DemoSample], seed: int) -> tuple[list[Image.Image], list[Hashable]]:
    """Real train images with their classes, plus (digits) generated non-digits labelled REJECT."""
    from megafusion.eval.judges import REJECT, non_digit_images

    images, labels = [s.image for s in train], [spec.class_label(s) for s in train]
    if not spec.has_class_prompts:
        return images, labels
    rejects = non_digit_images(NUM_REJECT_IMAGES, seed, images, images[0].width)
    return images + rejects, labels + [REJECT] * len(rejects)


def train_in_domain_classifier(spec: DatasetSpec, train: list[DemoSample], seed: int = 0) -> ImageClassifier:
    from megafusion.eval.classifier import train_classifier

    images, labels = _training_set(spec, train, seed)
    return train_classifier(images, labels, spec.classifier_mode, seed=seed)


def make_judges(spec: DatasetSpec, classifier: ImageClassifier, train: list[DemoSample], threshold: float,
                seed: int = 0) -> list:
    """The generation judges: digits: the in-domain MLP and a HOG + RBF-SVM, both with the confidence rule;
    shapes: the exact rule checker."""
    from megafusion.eval.judges import ClassifierJudge, RuleJudge, train_hog_svm

    if not spec.has_class_prompts:
        return [RuleJudge("rule_check", "exact rule checker (colour, shape and position of every blob)",
                          spec.rule_check)]
    images, labels = _training_set(spec, train, seed)
    svm = train_hog_svm(images, labels, size=images[0].width)
    mlp_kind = (f"sklearn MLPClassifier (1 hidden layer of {classifier.model.hidden_layer_sizes[0]}) on "
                f"{classifier.size}x{classifier.size} {classifier.mode} pixels")
    svm_kind = f"sklearn SVC (RBF kernel, C={svm.model.estimator.C:g}, sigmoid-calibrated) on HOG features"
    return [ClassifierJudge("mlp", mlp_kind, classifier, threshold),
            ClassifierJudge("hog_svm", svm_kind, svm, threshold)]


def balanced_subset(spec: DatasetSpec, samples: list[DemoSample], count: int) -> list[DemoSample]:
    """Up to `count` samples taken round-robin over classes (in split order within a class), so a partial
    held-out set is not dominated by whichever classes come first in the split."""
    by_class: dict[Hashable, list[DemoSample]] = {}
    for s in samples:
        by_class.setdefault(spec.class_label(s), []).append(s)
    queues = [by_class[c] for c in sorted(by_class, key=str)]
    out: list[DemoSample] = []
    depth = 0
    while len(out) < min(count, len(samples)):
        for q in queues:
            if depth < len(q) and len(out) < count:
                out.append(q[depth])
        depth += 1
    return out
