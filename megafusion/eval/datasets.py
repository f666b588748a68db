"""What the evaluation needs to know about each demo dataset: its real images, the prompts to generate from,
how a generated image is judged against its prompt, and how a caption is judged against the truth."""

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
    prompts: Callable[[int], list[Prompt]]
    # Exact rule check of a generated image, where the dataset has one (shapes); else the classifier decides.
    rule_check: Callable[[Image.Image, str], bool] | None
    caption_correct: Callable[[str, DemoSample], bool]
    caption_references: Callable[[DemoSample], list[str]]

    @property
    def source(self) -> str:
        return f"demo:{self.name}"

    def samples(self, split: str, resolution: int = 32) -> list[DemoSample]:
        if self.name == "digits":
            from megafusion.data_pipeline.demo.digits import digits_samples

            return digits_samples(split, resolution)
        from megafusion.data_pipeline.demo.shapes import shapes_samples

        return shapes_samples(split, resolution)

    def image_correct(self, image: Image.Image, prompt: Prompt, predicted: Hashable) -> bool:
        """The generation verdict: the rule check when there is one, else the classifier's prediction."""
        if self.rule_check is not None:
            return self.rule_check(image, prompt.text)
        return predicted == prompt.label


# --- digits -------------------------------------------------------------------------------------------------


def _digit_prompts(count: int) -> list[Prompt]:
    # One prompt per digit in the most literal training template; `count` is ignored (always the 10 classes).
    return [Prompt(DIGIT_CAPTION_TEMPLATES[0].format(d=d, word=DIGIT_WORDS[d]), d) for d in range(10)]


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


def _shape_prompts(count: int) -> list[Prompt]:
    """`count` distinct test-split captions, picked by a fixed hash order so single and paired layouts mix."""
    from megafusion.data_pipeline.demo.shapes import shapes_samples

    samples = sorted(shapes_samples("test", 16), key=lambda s: zlib.crc32(s.caption.encode()))
    prompts: dict[str, Prompt] = {}
    for s in samples:
        prompts.setdefault(s.caption, Prompt(s.caption, _shape_class(s)))
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
    rule_check=check_image,
    caption_correct=_shapes_caption_correct,
    caption_references=_shape_references,
)


def get_dataset(name: str) -> DatasetSpec:
    specs = {"digits": DIGITS, "shapes": SHAPES}
    if name not in specs:
        raise ValueError(f"dataset: must be one of {DATASETS}, got {name!r}")
    return specs[name]


def train_in_domain_classifier(spec: DatasetSpec, train: list[DemoSample], seed: int = 0) -> ImageClassifier:
    from megafusion.eval.classifier import train_classifier

    return train_classifier([s.image for s in train], [spec.class_label(s) for s in train], spec.classifier_mode,
                            seed=seed)


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
