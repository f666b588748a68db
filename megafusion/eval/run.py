"""`megafusion eval`: image generation, image understanding and text preservation of one trained LlamaFusion on a
demo dataset. Returns every number as one dict (also written to eval.json) and writes the figures."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from megafusion.inference.timesteps import DEFAULT_SPACING, resolve_spacing

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from PIL import Image

    from megafusion.data_pipeline.demo.common import DemoSample
    from megafusion.data_pipeline.tokenizer import TextTokenizer
    from megafusion.eval.classifier import ImageClassifier
    from megafusion.eval.datasets import DatasetSpec
    from megafusion.model import LlamaFusion

EVAL_JSON = "eval.json"


@dataclass
class EvalSettings:
    # The split every number comes from: "val" to choose settings on (its own prompts and seeds), "test" to report.
    split: str = "test"
    images_per_prompt: int = 10
    # Prompts to generate from (digits always uses its 10 classes).
    num_prompts: int = 10
    sampler: str = "ddim"
    num_steps: int = 25
    timestep_spacing: str = DEFAULT_SPACING
    # None: no classifier-free guidance.
    guidance_scale: float | None = 2.0
    # More CFG scales to score (accuracy and FID at each, same prompts and seed): the guidance trade-off curve.
    # 1.0 is plain conditional sampling, the paper's "without CFG"; the paper's "with CFG" is 1.55.
    guidance_sweep: tuple[float, ...] = ()
    # One more generation pass at guidance_scale with a phrasing no training caption uses, scored separately.
    out_of_template: bool = False
    # A judge counts an image as the asked class only at this probability or more. 0.7: on real digits the rule
    # keeps both judges' accuracy >= 0.95 (see the report's judge table), while blobs and flat fields fall out.
    confidence_threshold: float = 0.7
    # Which settings were chosen, and on what (free text per setting, shown in the report).
    chosen: dict[str, str] = field(default_factory=dict)
    num_caption_images: int = 200
    caption_max_new_tokens: int = 20
    text_max_new_tokens: int = 24
    num_text_prompts: int = 4
    # Captions shown with their images in captions.png.
    caption_sheet_size: int = 24
    # Held-out images for the noise-prediction loss with own / other / no caption (eval/denoising.py).
    num_denoising_images: int = 50
    # Generation uses seed + SPLIT_SEED_OFFSET[split] (eval/datasets.py).
    seed: int = 0
    # Image generation and captioning run in this dtype: auto = bfloat16 where this machine multiplies it clearly
    # faster than fp32 (measured: 2-3x faster with AMX, ~40x slower with AVX2 only), else float32. The text checks
    # always use fp32, where the fused model must match transformers to 1e-4.
    image_dtype: str = "auto"
    resolution: int = 32
    skip_text: bool = False
    progress: bool = True


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"[eval] {msg}", flush=True)


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    start = time.monotonic()
    result = fn()
    timings[name] = round(time.monotonic() - start, 1)
    return result


def _decode(vae: AutoencoderKL, latents: torch.Tensor, batch: int = 100) -> list[Image.Image]:
    from megafusion.inference.images import decode_latents

    return [im for i in range(0, len(latents), batch) for im in decode_latents(vae, latents[i : i + batch])]


def _encode(vae: AutoencoderKL, images: list[Image.Image], latent_size: int, batch: int = 100) -> torch.Tensor:
    from megafusion.inference.images import encode_images

    return torch.cat([encode_images(vae, images[i : i + batch], latent_size) for i in range(0, len(images), batch)])


def _generate(model: LlamaFusion, tokenizer: TextTokenizer, vae: AutoencoderKL, prompts: list, settings: EvalSettings,
              guidance: float | None) -> list[Image.Image]:
    from megafusion.eval.model_io import generate_latents
    from megafusion.inference.text_to_image import ImageSamplingConfig

    config = ImageSamplingConfig(settings.sampler, settings.num_steps, guidance, settings.timestep_spacing)
    latents = generate_latents(model, tokenizer, [p.text for p in prompts], settings.images_per_prompt, config,
                               settings.seed + _seed_offset(settings.split), progress=settings.progress)
    return _decode(vae, latents)


def _judge(images: list[Image.Image], prompts: list, judges: list, classifier: ImageClassifier,
           real_features: np.ndarray, k: int) -> dict:
    """One generated set scored by every judge (confusion matrices where judges name classes), with the
    in-domain classifier's plain argmax agreement and the in-domain FID."""
    from megafusion.eval.fid import feature_fid
    from megafusion.eval.judges import confusion_matrix

    asked = [prompts[i // k].label for i in range(len(images))]
    texts = [prompts[i // k].text for i in range(len(images))]
    verdicts = {j.name: j.verdicts(images, asked, texts) for j in judges}
    confusion = {j.name: confusion_matrix(asked, j.judged(images), [p.label for p in prompts])
                 for j in judges if hasattr(j, "judged")}
    by_judge = {name: float(np.mean(v)) for name, v in verdicts.items()}
    predicted = classifier.predict(images)
    return {
        "predicted": predicted,
        # Per image: the share of judges that call it correct (1.0 = all of them).
        "agreement": [float(np.mean([verdicts[n][i] for n in verdicts])) for i in range(len(images))],
        "verdicts": verdicts,
        # The weaker judge's accuracy: a target "by both judges" is met only when this is.
        "accuracy": min(by_judge.values()),
        "accuracy_by_judge": by_judge,
        "classifier_label_accuracy": float(np.mean([p == a for p, a in zip(predicted, asked, strict=True)])),
        "fid_in_domain": feature_fid(real_features, classifier.features(images)),
        "confusion": confusion,
    }


_POINT_KEYS = ("accuracy", "accuracy_by_judge", "classifier_label_accuracy", "fid_in_domain", "confusion")


def _per_prompt(prompts: list, judged: dict, k: int) -> list[dict]:
    return [{"prompt": p.text,
             "accuracy": min(sum(v[i * k : (i + 1) * k]) / k for v in judged["verdicts"].values()),
             "accuracy_by_judge": {n: sum(v[i * k : (i + 1) * k]) / k for n, v in judged["verdicts"].items()},
             "classifier_predictions": [str(x) for x in judged["predicted"][i * k : (i + 1) * k]]}
            for i, p in enumerate(prompts)]


def evaluate_images(model: LlamaFusion, tokenizer: TextTokenizer, vae: AutoencoderKL, spec: DatasetSpec,
                    classifier: ImageClassifier, judges: list, held: list[DemoSample], settings: EvalSettings,
                    out: Path | None) -> dict:
    """Text -> image on the evaluated split's prompts and seed: every judge's accuracy (and confusion matrices)
    and in-domain FID vs that split's real images, at `settings.guidance_scale` and at every scale of
    `settings.guidance_sweep` (one generation pass per distinct scale), plus, with `settings.out_of_template`,
    one pass of the out-of-template phrasing at `settings.guidance_scale`."""
    from megafusion.eval.figures import confusion_grid, generation_overview, prompt_grid

    prompts = spec.prompts(settings.num_prompts, settings.split, False)
    k = settings.images_per_prompt
    real = classifier.features([s.image for s in held])

    def run(scale: float | None, which: list) -> dict:
        return _judge(_generate(model, tokenizer, vae, which, settings, scale), which, judges, classifier, real, k)

    images = _generate(model, tokenizer, vae, prompts, settings, settings.guidance_scale)
    judged = _judge(images, prompts, judges, classifier, real, k)
    sweep = []
    for scale in settings.guidance_sweep:
        point = judged if scale == settings.guidance_scale else run(scale, prompts)
        sweep.append({"guidance_scale": scale, **{key: point[key] for key in _POINT_KEYS}})
    result = {
        "split": settings.split,
        "seed": settings.seed + _seed_offset(settings.split),
        "prompt_phrasing": spec.prompt_phrasing(settings.split, False),
        "num_images": len(images),
        "images_per_prompt": k,
        "sampler": settings.sampler,
        "num_steps": settings.num_steps,
        "timestep_spacing": resolve_spacing(settings.timestep_spacing, model.diffusion_args.prediction_type),
        "guidance_scale": settings.guidance_scale,
        "judges": {j.name: j.kind for j in judges},
        "confidence_threshold": settings.confidence_threshold,
        **{key: judged[key] for key in _POINT_KEYS},
        "confusion_rows": [str(p.label) for p in prompts],
        "per_prompt": _per_prompt(prompts, judged, k),
        "guidance_sweep": sweep,
    }
    if settings.out_of_template:
        other = spec.prompts(settings.num_prompts, settings.split, True)
        point = run(settings.guidance_scale, other)
        result["out_of_template"] = {"prompt_phrasing": spec.prompt_phrasing(settings.split, True),
                                     "guidance_scale": settings.guidance_scale,
                                     **{key: point[key] for key in _POINT_KEYS},
                                     "per_prompt": _per_prompt(other, point, k)}
    if out is not None:
        for i in range(len(prompts)):
            prompt_grid(images[i * k : (i + 1) * k], out / "generated" / f"prompt_{i:02d}.png")
        rows = [(p.text, images[i * k : (i + 1) * k], judged["agreement"][i * k : (i + 1) * k])
                for i, p in enumerate(prompts)]
        result["overview_png"] = str(generation_overview(rows, out / "generated.png").relative_to(out))
        panels = [(f"CFG {p['guidance_scale']:g}", p["confusion"]) for p in sweep] or \
                 [(f"CFG {settings.guidance_scale}", judged["confusion"])]
        if "out_of_template" in result:
            oot = result["out_of_template"]
            panels.append((f"out-of-template, CFG {oot['guidance_scale']}", oot["confusion"]))
        if judged["confusion"]:
            result["confusion_png"] = str(confusion_grid(panels, result["confusion_rows"], result["judges"],
                                                         out / "confusion.png").relative_to(out))
    return result


def _seed_offset(split: str) -> int:
    from megafusion.eval.datasets import SPLIT_SEED_OFFSET

    return SPLIT_SEED_OFFSET[split]


def evaluate_captions(model: LlamaFusion, tokenizer: TextTokenizer, vae: AutoencoderKL, spec: DatasetSpec,
                      held: list[DemoSample], settings: EvalSettings, out: Path | None) -> dict:
    """Image -> text on held-out images of the evaluated split: caption accuracy and CIDEr."""
    from megafusion.eval.captions import caption_accuracy, cider
    from megafusion.eval.datasets import balanced_subset
    from megafusion.eval.figures import caption_sheet
    from megafusion.eval.model_io import caption_latents

    held = balanced_subset(spec, held, settings.num_caption_images)
    latents = _encode(vae, [s.image for s in held], model.image_config.latent_size)
    captions = caption_latents(model, tokenizer, latents, settings.caption_max_new_tokens, progress=settings.progress)
    accuracy, verdicts = caption_accuracy(captions, held, spec.caption_correct)
    refs = {s.key: spec.caption_references(s) for s in held}
    score, _ = cider(refs, {s.key: c for s, c in zip(held, captions, strict=True)})
    result = {
        "num_images": len(held),
        "accuracy": accuracy,
        "cider": score,
        "cider_tokenizer": "lowercase, punctuation stripped, whitespace split (the PTB tokenizer needs Java)",
        "examples": [{"key": s.key, "truth": s.caption, "generated": c, "correct": ok}
                     for s, c, ok in zip(held, captions, verdicts, strict=True)],
    }
    if out is not None:
        n = settings.caption_sheet_size
        sheet = [(s.image, c, ok) for s, c, ok in zip(held[:n], captions[:n], verdicts[:n], strict=True)]
        result["sheet_png"] = str(caption_sheet(sheet, out / "captions.png").relative_to(out))
    return result


def evaluate_text(model: LlamaFusion, tokenizer: TextTokenizer, base: Path, settings: EvalSettings) -> dict:
    """Greedy outputs and log-likelihoods vs transformers' LlamaForCausalLM; perplexity of both."""
    from megafusion.eval.heldout_text import PARAGRAPHS, PROMPTS
    from megafusion.eval.text import fused_logits, hf_logits, load_base_lm, perplexity, prompt_ids, text_identity

    base_lm = load_base_lm(base)
    texts = PROMPTS[: settings.num_text_prompts]
    identity = text_identity(model, base_lm, tokenizer, [prompt_ids(tokenizer, p) for p in texts],
                             settings.text_max_new_tokens)
    for row, text in zip(identity["prompts"], texts, strict=True):
        row["prompt"] = text  # the user's words, not the whole chat-template rendering
    ppl_fused = perplexity(fused_logits(model), tokenizer, PARAGRAPHS)
    ppl_base = perplexity(hf_logits(base_lm), tokenizer, PARAGRAPHS)
    return {**identity, "perplexity": ppl_fused, "perplexity_base": ppl_base,
            "perplexity_paragraphs": len(PARAGRAPHS)}


def evaluate_denoising(model: LlamaFusion, tokenizer: TextTokenizer, vae: AutoencoderKL, spec: DatasetSpec,
                       held: list[DemoSample], settings: EvalSettings) -> dict:
    """Held-out DDPM loss and the caption's share of it (sensitive long before samples look right)."""
    from megafusion.diffusion.schedule import DDPMSchedule
    from megafusion.eval.conditioning import conditioning_probe
    from megafusion.eval.datasets import balanced_subset
    from megafusion.eval.denoising import heldout_denoising, mismatched_captions

    held = balanced_subset(spec, held, settings.num_denoising_images)
    latents = _encode(vae, [s.image for s in held], model.image_config.latent_size)
    schedule = DDPMSchedule(model.diffusion_args)  # the noise process the model was trained with
    captions, labels = [s.caption for s in held], [spec.class_label(s) for s in held]
    result = heldout_denoising(model, tokenizer, latents, captions, labels, schedule, seed=settings.seed)
    result["conditioning_probe"] = conditioning_probe(model, tokenizer, latents, captions,
                                                      mismatched_captions(captions, labels), schedule,
                                                      seed=settings.seed)
    return result


def image_precision(model: LlamaFusion, image_dtype: str) -> dict[str, Any]:
    """The dtype generation and captioning run in (`auto` measured at the model's matmul shapes), as a record."""
    from megafusion.common.precision import choose_precision, model_matmul_shapes

    names = {"auto": "auto", "float32": "fp32", "bfloat16": "bf16", "fp32": "fp32", "bf16": "bf16"}
    if image_dtype not in names:
        raise ValueError(f"image_dtype: must be one of auto, float32, bfloat16; got {image_dtype!r}")
    device = model.embed_tokens.weight.device
    shapes = model_matmul_shapes(model.arch.hidden_size, model.arch.intermediate_size)
    return choose_precision(names[image_dtype], device, shapes).to_record()


def _image_evals(model: LlamaFusion, tokenizer: TextTokenizer, vae: AutoencoderKL, spec: DatasetSpec,
                 classifier: ImageClassifier, judges: list, held: list[DemoSample], settings: EvalSettings,
                 out: Path | None, timings: dict[str, float], precision: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Generation and captioning on a copy of the model in the chosen precision (the fp32 one stays exact)."""
    dtype = torch.bfloat16 if precision["precision"] == "bf16" else torch.float32
    image_model = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        gen = _timed(timings, "generation", lambda: evaluate_images(image_model, tokenizer, vae, spec, classifier,
                                                                    judges, held, settings, out))
        for point in gen["guidance_sweep"]:
            _say(f"CFG {point['guidance_scale']:g}: generation accuracy {_by_judge(point)}, "
                 f"FID {point['fid_in_domain']:.2f}", settings.progress)
        if "out_of_template" in gen:
            _say(f"out-of-template phrasing: generation accuracy {_by_judge(gen['out_of_template'])}",
                 settings.progress)
        _say(f"generation accuracy {_by_judge(gen)}, FID {gen['fid_in_domain']:.2f} (CFG "
             f"{gen['guidance_scale']}); captioning held-out images", settings.progress)
        cap = _timed(timings, "captioning", lambda: evaluate_captions(image_model, tokenizer, vae, spec, held,
                                                                      settings, out))
        _say(f"caption accuracy {cap['accuracy']:.3f}, CIDEr {cap['cider']:.3f}; held-out denoising loss",
             settings.progress)
        den = _timed(timings, "denoising", lambda: evaluate_denoising(image_model, tokenizer, vae, spec, held,
                                                                      settings))
        probe = den["conditioning_probe"]
        _say(f"held-out noise MSE {den['loss_own_caption']:.4f} (caption gain {den['caption_gain']:+.4f}); a "
             f"caption swap moves the image tokens' last hidden states by {probe['caption_swap_hidden_change']:.2%} "
             f"and the noise prediction by {probe['caption_swap_noise_change']:.2%}", settings.progress)
    return gen, cap, den


def _by_judge(point: dict) -> str:
    return ", ".join(f"{name} {acc:.3f}" for name, acc in point["accuracy_by_judge"].items())


def _judge_record(judge: Any, splits: dict[str, list[DemoSample]], spec: DatasetSpec) -> dict:
    """How a judge does on real held-out images: plain argmax accuracy and accuracy under the confidence rule."""
    record: dict[str, Any] = {"kind": judge.kind}
    for split, samples in splits.items():
        images, labels = [s.image for s in samples], [spec.class_label(s) for s in samples]
        if hasattr(judge, "model"):
            probs = judge.model.probabilities(images)
            argmax = [judge.model.classes[i] for i in probs.argmax(axis=1)]
            record[f"{split}_accuracy"] = float(np.mean([p == y for p, y in zip(argmax, labels, strict=True)]))
        texts = [s.caption for s in samples]
        record[f"{split}_confident_accuracy"] = float(np.mean(judge.verdicts(images, labels, texts)))
    return record


def evaluate(model_dir: str | Path, vae_dir: str | Path, dataset: str, out_dir: str | Path | None = None,
             settings: EvalSettings | None = None, base: str | Path | None = None) -> dict:
    """The whole evaluation. `base` overrides the base LM recorded in the model (for the text checks and the
    tokenizer)."""
    from megafusion.data_pipeline.vae import load_vae
    from megafusion.eval.datasets import (
        EVAL_SPLITS,
        balanced_subset,
        get_dataset,
        make_judges,
        train_in_domain_classifier,
    )
    from megafusion.eval.fid import feature_fid, inception_fid_status
    from megafusion.inference.tokens import tokenizer_for
    from megafusion.model import LlamaFusion

    settings = settings or EvalSettings()
    spec = get_dataset(dataset)
    if settings.split not in EVAL_SPLITS:  # before minutes of loading
        raise ValueError(f"split: must be one of {EVAL_SPLITS}, got {settings.split!r}")
    out = Path(out_dir) if out_dir is not None else None
    timings: dict[str, float] = {}
    start = time.monotonic()
    _say(f"loading {model_dir} and the VAE {vae_dir}", settings.progress)
    model = LlamaFusion.from_pretrained(model_dir, dtype=torch.float32).eval()
    base_path = Path(base or model.base_path or "")
    if not base_path.exists():
        raise FileNotFoundError(f"base model {base_path}: not found (pass --base)")
    tokenizer = tokenizer_for(model, base_path)  # an error if it does not start documents as in training
    vae = load_vae(vae_dir)

    _say(f"training the judges on real {dataset} train images; every number below is on the {settings.split} "
         "split", settings.progress)
    train = spec.samples("train", settings.resolution)
    real = {split: spec.samples(split, settings.resolution) for split in EVAL_SPLITS}
    held = real[settings.split]
    classifier = _timed(timings, "classifier", lambda: train_in_domain_classifier(spec, train, settings.seed))
    judges = _timed(timings, "judges", lambda: make_judges(spec, classifier, train, settings.confidence_threshold,
                                                           settings.seed))
    real_subset = balanced_subset(spec, train, settings.images_per_prompt * len(
        spec.prompts(settings.num_prompts, settings.split, False)))
    test = real["test"]
    clf = {
        "kind": f"sklearn MLPClassifier (1 hidden layer of {classifier.model.hidden_layer_sizes[0]}) on "
                f"{classifier.size}x{classifier.size} {classifier.mode} pixels",
        "test_accuracy": classifier.accuracy([s.image for s in test], [spec.class_label(s) for s in test]),
        "train_images": len(train),
        "test_images": len(test),
        "heldout_split": settings.split,
        "heldout_images": len(held),
        # What the FID of a perfect generator would be with this many samples: real train vs real held-out images
        # (the evaluated split; the test-split value is kept under its old name).
        "fid_real_floor": feature_fid(classifier.features([s.image for s in held]),
                                      classifier.features([s.image for s in real_subset])),
        "fid_real_train_vs_test": feature_fid(classifier.features([s.image for s in test]),
                                              classifier.features([s.image for s in real_subset])),
    }
    # The judges' own quality on real digits of both held-out splits (no model involved: nothing is chosen).
    judge_records = {j.name: _judge_record(j, real, spec) for j in judges}
    # The same held-out images after a VAE round trip: what a perfect generator could at best score, so a low
    # generation accuracy is the model's and not the judges' dislike of decoded images.
    with torch.no_grad():
        decoded = _decode(vae, _encode(vae, [s.image for s in held], model.image_config.latent_size))
    for j in judges:
        judge_records[j.name][f"{settings.split}_vae_roundtrip_confident_accuracy"] = float(np.mean(j.verdicts(
            decoded, [spec.class_label(s) for s in held], [s.caption for s in held])))
    _say(f"classifier test accuracy {clf['test_accuracy']:.3f}; judges on real test images under the confidence "
         "rule: " + ", ".join(f"{n} {r['test_confident_accuracy']:.3f}" for n, r in judge_records.items())
         + "; generating images", settings.progress)
    precision = image_precision(model, settings.image_dtype)
    _say(f"image precision {precision['precision']} ({precision['reason']})", settings.progress)
    gen, cap, den = _image_evals(model, tokenizer, vae, spec, classifier, judges, held, settings, out, timings,
                                 precision)
    text = None
    if not settings.skip_text:
        _say("text: greedy outputs and log-likelihoods vs the base LM, perplexity", settings.progress)
        text = _timed(timings, "text", lambda: evaluate_text(model, tokenizer, base_path, settings))
        _say(f"text identical to base: {'yes' if text['identical'] else 'NO'} (max |dlogp| "
             f"{text['max_abs_logprob_diff']:.2e}); perplexity {text['perplexity']:.3f}", settings.progress)
    timings["total"] = round(time.monotonic() - start, 1)
    result = {
        "model": str(model_dir),
        "vae": str(vae_dir),
        "base": str(base_path),
        "dataset": dataset,
        # The noise process the samplers and the held-out loss used: the one the model records.
        "diffusion": asdict(model.diffusion_args),
        "settings": {k: v for k, v in asdict(settings).items() if k != "progress"},
        "image_precision": precision,
        "split": settings.split,
        "classifier": clf,
        "judges": judge_records,
        "generation": gen,
        "inception_fid": inception_fid_status(),
        "captioning": cap,
        "denoising": den,
        "text": text,
        "seconds": timings,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / EVAL_JSON).write_text(json.dumps(result, indent=2) + "\n")
    return result
