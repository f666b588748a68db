"""`megafusion generate {text,image,caption,interleave,edit}`: the command-line face of megafusion.inference.

Heavy imports (torch, transformers, diffusers) happen inside the handlers, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from megafusion.inference.timesteps import add_spacing_argument

MODES = ("text", "image", "caption", "interleave", "edit")


def _model_args(p: argparse.ArgumentParser, allow_base: bool = False) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="directory written by LlamaFusion.save_pretrained")
    if allow_base:
        src.add_argument("--base", help="plain HF Llama directory or .gguf file (text generation only)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory, tokenizer file or .gguf (default: the model's base checkpoint)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="auto: bfloat16 where this machine multiplies it clearly faster than float32 (measured)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=None, help="seed of every random draw (sampling, noise)")


def _text_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)


def _image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", default="ddim", choices=("ddpm", "ddim"))
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    add_spacing_argument(p)
    p.add_argument("--cfg", type=float, default=1.55, help="classifier-free guidance scale (paper: 1.55)")
    p.add_argument("--no-cfg", action="store_true", help="no unconditional branch")
    # The noise process comes from the model (fusion_config.json); these only assert what the caller expects.
    p.add_argument("--config", default=None,
                   help="training YAML; its diffusion section must agree with the model's (checked, else an error)")
    p.add_argument("--num-train-timesteps", type=int, default=None,
                   help="must equal the model's recorded num_train_timesteps (checked, else an error)")
    p.add_argument("--vae", default=None, help="diffusers AutoencoderKL directory; without it latents are saved")
    p.add_argument("--out", default="generated", help="output directory")


def _image_input_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="an image file (needs --vae to encode it)")
    src.add_argument("--latents", help="a safetensors file with a 'latents' tensor (C,H,W) or (N,C,H,W)")


def add_generate_parser(sub: Any) -> None:
    """Register `generate` and its modes on the top-level subparsers."""
    gen = sub.add_parser("generate", help="generate text, images, captions, interleaved text+images, edits")
    modes = gen.add_subparsers(dest="mode", required=True)

    p = modes.add_parser("text", help="text answer to a prompt (greedy by default, KV cache)")
    _model_args(p, allow_base=True)
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    _text_args(p, 128)

    p = modes.add_parser("image", help="text -> image (DDPM/DDIM with classifier-free guidance)")
    _model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    _image_args(p)

    p = modes.add_parser("caption", help="image -> text")
    _model_args(p)
    _image_input_args(p)
    p.add_argument("--prompt", default=None, help="text placed before the image")
    p.add_argument("--vae", default=None, help="diffusers AutoencoderKL directory (for --image)")
    _text_args(p, 32)

    p = modes.add_parser("interleave", help="text that may contain generated images")
    _model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument("--max-images", type=int, default=1)
    _text_args(p, 128)
    _image_args(p)

    p = modes.add_parser("edit", help="source image + instruction -> edited image (paper section 5.2)")
    _model_args(p)
    _image_input_args(p)
    p.add_argument("--instruction", required=True)
    _image_args(p)


# ---------------------------------------------------------------------- handlers
def _dtype(args: argparse.Namespace, model: Any) -> Any:
    """--dtype, with `auto` measured at the model's own matmul shapes on the target device."""
    import torch

    from megafusion.common.precision import choose_precision, model_matmul_shapes

    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    shapes = model_matmul_shapes(model.arch.hidden_size, model.arch.intermediate_size)
    choice = choose_precision("auto", args.device, shapes)
    print(f"[generate] precision {choice.precision}: {choice.reason}", file=sys.stderr)
    return choice.dtype


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from megafusion.inference.tokens import tokenizer_for
    from megafusion.model import LlamaFusion

    if getattr(args, "base", None):
        model = LlamaFusion.from_llama(args.base, dtype=torch.float32)
    else:
        model = LlamaFusion.from_pretrained(args.model, dtype=torch.float32)
    model = model.to(_dtype(args, model)).to(args.device).eval()
    if hasattr(args, "num_train_timesteps"):  # the image modes: fail before any tokenizer, VAE or sampling work
        check_diffusion_options(args, model)
    return model, tokenizer_for(model, args.tokenizer)


def _generator(args: argparse.Namespace) -> Any:
    import torch

    return None if args.seed is None else torch.Generator(args.device).manual_seed(args.seed)


def _sampling(args: argparse.Namespace) -> Any:
    from megafusion.inference.sampling import SamplingConfig

    return SamplingConfig(args.max_new_tokens, args.temperature, args.top_p)


def check_diffusion_options(args: argparse.Namespace, model: Any) -> None:
    """--num-train-timesteps and --config's diffusion section may only repeat what the model was trained with
    (`model.diffusion_args`, from fusion_config.json): sampling with another noise process gives wrong images
    without a word, so a contradiction stops with both values."""
    from dataclasses import fields

    trained = model.diffusion_args
    source = args.model
    if args.num_train_timesteps is not None and args.num_train_timesteps != trained.num_train_timesteps:
        raise ValueError(
            f"--num-train-timesteps {args.num_train_timesteps} contradicts the model {source}, trained with "
            f"num_train_timesteps {trained.num_train_timesteps} (fusion_config.json); drop the option"
        )
    if args.config is not None:
        from megafusion.config import load_config

        given = load_config(args.config).diffusion.args()
        for f in fields(trained):
            ours, theirs = getattr(given, f.name), getattr(trained, f.name)
            if ours != theirs:
                raise ValueError(
                    f"--config {args.config}: diffusion.{f.name} is {ours!r} but the model {source} was trained "
                    f"with {f.name} {theirs!r} (fusion_config.json)"
                )


def _image_config(args: argparse.Namespace) -> Any:
    from megafusion.inference.text_to_image import ImageSamplingConfig

    return ImageSamplingConfig(args.sampler, args.steps, None if args.no_cfg else args.cfg, args.timestep_spacing)


def _vae(args: argparse.Namespace, model: Any) -> Any:
    if not getattr(args, "vae", None):
        return None
    from megafusion.data_pipeline.vae import load_vae

    return load_vae(args.vae, model.embed_tokens.weight.dtype).to(args.device)


def _input_latents(args: argparse.Namespace, model: Any, vae: Any) -> Any:
    from megafusion.inference.images import check_latents, encode_images, load_latents

    image = model.image_config
    if args.latents:
        latents = load_latents(args.latents)
    else:
        if vae is None:
            raise ValueError("--image needs --vae to encode it into latents (or pass --latents)")
        from PIL import Image

        latents = encode_images(vae, [Image.open(args.image)], image.latent_size)
    latents = check_latents(latents, image.latent_channels, image.latent_size)
    return latents.to(args.device, model.embed_tokens.weight.dtype)


def _save(latents: Any, images: Any, out: str, prefix: str) -> list[Path]:
    from megafusion.inference.images import save_images, save_latents

    paths = [save_latents(latents, Path(out) / f"{prefix}_latents.safetensors")]
    if images:
        paths += save_images(images, out, prefix)
    return paths


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from megafusion import inference

    model, tokenizer = _load(args)
    generator = _generator(args)
    with torch.no_grad():
        if args.mode == "text":
            answers = inference.generate_text(model, tokenizer, args.prompt, _sampling(args),
                                              chat=False if args.no_chat else None, seed=args.seed)
            for answer in answers:
                print(answer)
        elif args.mode == "image":
            vae = _vae(args, model)
            out = inference.generate_images(model, tokenizer, args.prompt, _image_config(args), generator, vae,
                                            args.num_images, progress=True)
            for p in _save(out.latents, out.images, args.out, "image"):
                print(p)
        elif args.mode == "caption":
            vae = _vae(args, model)
            latents = _input_latents(args, model, vae)
            for caption in inference.caption_images(model, tokenizer, latents, args.prompt, _sampling(args),
                                                    generator):
                print(caption)
        elif args.mode == "interleave":
            vae = _vae(args, model)
            out = inference.generate_interleaved(
                model, tokenizer, args.prompt, _sampling(args), _image_config(args), args.max_images,
                chat=False if args.no_chat else None, generator=generator, vae=vae, progress=True,
            )
            latents = [s for s in out.segments if isinstance(s, torch.Tensor)]
            paths = _save(torch.stack(latents), out.images, args.out, "interleave") if latents else []
            k = 0
            for segment in out.segments:
                if isinstance(segment, str):
                    print(segment, end="")
                else:
                    print(f"\n[image {k}]\n", end="")
                    k += 1
            print()
            for p in paths:
                print(p)
        else:
            vae = _vae(args, model)
            sources = _input_latents(args, model, vae)
            out = inference.edit_images(model, tokenizer, sources, args.instruction, _image_config(args),
                                        generator, vae, progress=True)
            for p in _save(out.latents, out.images, args.out, "edit"):
                print(p)
    return 0
