"""`megafusion demo` and `megafusion ablate`: argument parsing only; the work is in pipeline / ablate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def default_demo_out(dataset: str) -> str:
    return "outputs/demo" if dataset == "digits" else f"outputs/demo-{dataset}"


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on a built-in dataset (CPU, ~20 min): train, evaluate, "
                                    "report [--section.key=value overrides the run config]")
    p.add_argument("--dataset", default="digits", choices=("digits", "shapes"))
    p.add_argument("--out", default=None,
                   help="output directory, steps already done there are reused (default: outputs/demo for digits, "
                        "outputs/demo-shapes for shapes)")
    p.add_argument("--config", default=None,
                   help="run YAML: a path or a packaged name such as demo-digits (default: demo-<dataset>)")
    p.add_argument("--vae-steps", type=int, default=None, help="demo VAE training steps")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: $OMP_NUM_THREADS, else the cores the load average shows idle)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny budget (random tiny Llama, a few steps): checks the pipeline in about a minute")


def add_ablate_parser(sub: Any) -> None:
    p = sub.add_parser("ablate", help="paper section 5 at small scale: separation none/ffn/deep x lr ratio 0/0.1/1")
    p.add_argument("--dataset", default="digits", choices=("digits", "shapes"))
    p.add_argument("--out", default="outputs/ablate")
    p.add_argument("--demo-out", default=None,
                   help="demo output dir whose VAE and shards are reused (default: the demo's default for the dataset)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per arm (default: the demo config's, with its warmup)")
    p.add_argument("--separations", default="none,ffn,deep")
    p.add_argument("--ratios", default="0,0.1,1", help="lr_text / lr_image")
    p.add_argument("--seeds", default="0", help="training seeds per arm, e.g. 0,1,2 (the table gives mean and spread)")
    p.add_argument("--quick", action="store_true", help="tiny budget (random tiny Llama) to check the grid runs")


def run_demo_command(args: argparse.Namespace, overrides: list[str]) -> int:
    from megafusion.demo.data_prep import VaeSettings
    from megafusion.demo.pipeline import DemoSettings, quick_settings, run_demo

    out = Path(args.out or default_demo_out(args.dataset))
    if args.quick:
        settings = quick_settings(args.dataset, out)
        settings.overrides += overrides
    else:
        settings = DemoSettings(dataset=args.dataset, out=out, overrides=overrides)
    settings.threads = args.threads
    if args.config:
        settings.config = args.config  # a path or a packaged name, resolved by demo_config
    if args.vae_steps is not None:
        settings.vae = VaeSettings(**{**vars(settings.vae), "steps": args.vae_steps})
    report = run_demo(settings)
    print(f"\nreport: {out / 'report.md'}")
    print(json.dumps({k: v["value"] for k, v in report["targets"].items()}, indent=2))
    return 0


def run_ablate_command(args: argparse.Namespace, overrides: list[str]) -> int:
    from megafusion.demo.ablate import AblationSettings, run_ablation

    settings = AblationSettings(
        dataset=args.dataset, out=Path(args.out), steps=args.steps,
        demo_out=Path(args.demo_out or default_demo_out(args.dataset)),
        separations=[s.strip() for s in args.separations.split(",") if s.strip()],
        ratios=[float(r) for r in args.ratios.split(",") if r.strip()], quick=args.quick, overrides=overrides,
        seeds=[int(x) for x in args.seeds.split(",") if x.strip()],
    )
    result = run_ablation(settings)
    print(f"\ntable: {Path(args.out) / 'ablation.md'}")
    print(json.dumps(result["rows"], indent=2))
    return 0
