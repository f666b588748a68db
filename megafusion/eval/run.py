"""`megafusion eval`: image generation, image understanding and text preservation of one trained LlamaFusion on a
demo dataset. Returns every number as one dict (also written to eval.json) and writes the figures."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

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
    images_per_prompt: int = 10
    # Prompts to generate from (digits always uses its 10 classes).
    num_prompts: int = 10
    sampler: str = "ddim"
    num_steps: int = 25
    # None: no classifier-free guidance.
    guidance_scale: float | None = 2.0
    # More CFG scales to score (accuracy and FID at each, same prompts and seed): the guidance trade-off curve.
    # 1.0 is plain conditional sampling, the paper's "without CFG"; the paper's "with CFG" is 1.55.
    guidance_sweep: tuple[float, ...] = ()
    num_caption_images: int = 200
    caption_max_new_tokens: int = 20
    text_max_new_tokens: int = 24
    num_text_prompts: int = 4
    # Captions shown with their images in captions.png.
    caption_sheet_size: int = 24
    # Held-out images for the noise-prediction loss with own / other / no caption (eval/denoising.py).
    num_denoising_images: int = 50
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

    config = ImageSamplingConfig(settings.sampler, settings.num_steps, guidance)
    latents = generate_latents(model, tokenizer, [p.text for p in prompts], settings.images_per_prompt, config,
                               settings.seed, progress=settings.progress)
    return _decode(vae, latents)


def _judge(images: list[Image.Image], prompts: list, spec: DatasetSpec, classifier: ImageClassifier,
           real_features: np.ndarray, k: int) -> dict:
    """Per-image verdicts (rule check or classifier), label agreement and in-domain FID of one generated set."""
    from megafusion.eval.fid import feature_fid

    predicted = classifier.predict(images)
    verdicts = [spec.image_correct(images[i], prompts[i // k], predicted[i]) for i in range(len(images))]
    return {
        "predicted": predicted,
        "verdicts": verdicts,
        "accuracy": float(np.mean(verdicts)),
        "classifier_label_accuracy": float(np.mean([predicted[i] == prompts[i // k].label
                                                    for i in range(len(images))])),
        "fid_in_domain": feature_fid(real_features, classifier.features(images)),
    }


def evaluate_images(model: LlamaFusion, tokenizer: TextTokenizer, vae: AutoencoderKL, spec: DatasetSpec,
                    classifier: ImageClassifier, test: list[DemoSample], settings: EvalSettings,
                    out: Path | None) -> dict:
    """Text -> image: per-prompt correctness (rule check or classifier) and in-domain FID vs real test images, at
    `settings.guidance_scale` and at every scale of `settings.guidance_sweep`."""
    from megafusion.eval.figures import generation_overview, prompt_grid

    prompts = spec.prompts(settings.num_prompts)
    k = settings.images_per_prompt
    real = classifier.features([s.image for s in test])
    images = _generate(model, tokenizer, vae, prompts, settings, settings.guidance_scale)
    judged = _judge(images, prompts, spec, classifier, real, k)
    predicted, verdicts = judged["predicted"], judged["verdicts"]
    per_prompt = [{"prompt": p.text, "accuracy": sum(verdicts[i * k : (i + 1) * k]) / k,
                   "classifier_predictions": [str(x) for x in predicted[i * k : (i + 1) * k]]}
                  for i, p in enumerate(prompts)]
    sweep = []
    for scale in settings.guidance_sweep:
        point = judged if scale == settings.guidance_scale else _judge(
            _generate(model, tokenizer, vae, prompts, settings, scale), prompts, spec, classifier, real, k)
        sweep.append({"guidance_scale": scale, **{key: point[key] for key in
                                                  ("accuracy", "classifier_label_accuracy", "fid_in_domain")}})
    result = {
        "num_images": len(images),
        "images_per_prompt": k,
        "sampler": settings.sampler,
        "num_steps": settings.num_steps,
        "guidance_scale": settings.guidance_scale,
        "judge": "rule checker (check_image)" if spec.rule_check is not None else "in-domain classifier",
        "accuracy": judged["accuracy"],
        "classifier_label_accuracy": judged["classifier_label_accuracy"],
        "fid_in_domain": judged["fid_in_domain"],
        "per_prompt": per_prompt,
        "guidance_sweep": sweep,
    }
    if out is not None:
        for i in range(len(prompts)):
            prompt_grid(images[i * k : (i + 1) * k], out / "generated" / f"prompt_{i:02d}.png")
        rows = [(p.text, images[i * k : (i + 1) * k], verdicts[i * k : (i + 1) * k]) for i, p in enumerate(prompts)]
        result["overview_png"] = str(generation_overview(rows, out / "generated.png").relative_to(out))
    return result


def evaluate_captions(model: LlamaFusion, tokenizer: TextTokenizer, vae: AutoencoderKL, spec: DatasetSpec,
                      test: list[DemoSample], settings: EvalSettings, out: Path | None) -> dict:
    """Image -> text on held-out images: caption accuracy and CIDEr."""
    from megafusion.eval.captions import caption_accuracy, cider
    from megafusion.eval.datasets import balanced_subset
    from megafusion.eval.figures import caption_sheet
    from megafusion.eval.model_io import caption_latents

    held = balanced_subset(spec, test, settings.num_caption_images)
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
                       test: list[DemoSample], settings: EvalSettings) -> dict:
    """Held-out DDPM loss and the caption's share of it (sensitive long before samples look right)."""
    from megafusion.diffusion.schedule import DDPMSchedule
    from megafusion.eval.datasets import balanced_subset
    from megafusion.eval.denoising import heldout_denoising

    held = balanced_subset(spec, test, settings.num_denoising_images)
    latents = _encode(vae, [s.image for s in held], model.image_config.latent_size)
    schedule = DDPMSchedule(model.diffusion_args)  # the noise process the model was trained with
    return heldout_denoising(model, tokenizer, latents, [s.caption for s in held],
                             [spec.class_label(s) for s in held], schedule, seed=settings.seed)


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
                 classifier: ImageClassifier, test: list[DemoSample], settings: EvalSettings, out: Path | None,
                 timings: dict[str, float], precision: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Generation and captioning on a copy of the model in the chosen precision (the fp32 one stays exact)."""
    dtype = torch.bfloat16 if precision["precision"] == "bf16" else torch.float32
    image_model = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        gen = _timed(timings, "generation", lambda: evaluate_images(image_model, tokenizer, vae, spec, classifier,
                                                                    test, settings, out))
        for point in gen["guidance_sweep"]:
            _say(f"CFG {point['guidance_scale']:g}: generation accuracy {point['accuracy']:.3f}, "
                 f"FID {point['fid_in_domain']:.2f}", settings.progress)
        _say(f"generation accuracy {gen['accuracy']:.3f}, FID {gen['fid_in_domain']:.2f} (CFG "
             f"{gen['guidance_scale']}); captioning held-out images", settings.progress)
        cap = _timed(timings, "captioning", lambda: evaluate_captions(image_model, tokenizer, vae, spec, test,
                                                                      settings, out))
        _say(f"caption accuracy {cap['accuracy']:.3f}, CIDEr {cap['cider']:.3f}; held-out denoising loss",
             settings.progress)
        den = _timed(timings, "denoising", lambda: evaluate_denoising(image_model, tokenizer, vae, spec, test,
                                                                      settings))
        _say(f"held-out noise MSE {den['loss_own_caption']:.4f} (caption gain {den['caption_gain']:+.4f})",
             settings.progress)
    return gen, cap, den


def evaluate(model_dir: str | Path, vae_dir: str | Path, dataset: str, out_dir: str | Path | None = None,
             settings: EvalSettings | None = None, base: str | Path | None = None) -> dict:
    """The whole evaluation. `base` overrides the base LM recorded in the model (for the text checks and the
    tokenizer)."""
    from megafusion.data_pipeline.vae import load_vae
    from megafusion.eval.datasets import balanced_subset, get_dataset, train_in_domain_classifier
    from megafusion.eval.fid import feature_fid, inception_fid_status
    from megafusion.inference.tokens import tokenizer_for
    from megafusion.model import LlamaFusion

    settings = settings or EvalSettings()
    spec = get_dataset(dataset)
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

    _say(f"training the in-domain classifier on real {dataset} train images", settings.progress)
    train, test = spec.samples("train", settings.resolution), spec.samples("test", settings.resolution)
    classifier = _timed(timings, "classifier", lambda: train_in_domain_classifier(spec, train, settings.seed))
    real_subset = balanced_subset(spec, train, settings.images_per_prompt * len(spec.prompts(settings.num_prompts)))
    clf = {
        "kind": f"sklearn MLPClassifier (1 hidden layer of {classifier.model.hidden_layer_sizes[0]}) on "
                f"{classifier.size}x{classifier.size} {classifier.mode} pixels",
        "test_accuracy": classifier.accuracy([s.image for s in test], [spec.class_label(s) for s in test]),
        "train_images": len(train),
        "test_images": len(test),
        # What the FID of a perfect generator would be with this many samples: real train vs real test.
        "fid_real_train_vs_test": feature_fid(classifier.features([s.image for s in test]),
                                              classifier.features([s.image for s in real_subset])),
    }
    _say(f"classifier test accuracy {clf['test_accuracy']:.3f}; generating images", settings.progress)
    precision = image_precision(model, settings.image_dtype)
    _say(f"image precision {precision['precision']} ({precision['reason']})", settings.progress)
    gen, cap, den = _image_evals(model, tokenizer, vae, spec, classifier, test, settings, out, timings, precision)
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
        "classifier": clf,
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
