"""`megafusion ablate`: the paper's section 5 grid at demo scale, separation none/ffn/deep x lr ratio
eta_text/eta_img in {0, 0.1, 1}, each arm trained from the same base, VAE and shards for the same steps.

Text score: perplexity change on the held-out paragraphs vs the base LM (0 when the text path is untouched) and
whether greedy outputs still equal the base's. Image scores: generation accuracy, in-domain FID, caption
accuracy. Each arm trains in its own process (a fresh process group and memory per run)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megafusion.demo.data_prep import VaeSettings, prepare_demo_data
from megafusion.demo.pipeline import DEMO_GUIDANCE, QUICK_EVAL, QUICK_OVERRIDES, QUICK_VAE, DemoSettings, demo_config
from megafusion.demo.runs import export_ready, export_run, trained_step


@dataclass
class AblationSettings:
    dataset: str = "digits"
    out: Path = Path("outputs/ablate")
    # Where the demo's VAE and shards are (built there first if missing).
    demo_out: Path = Path("outputs/demo")
    steps: int = 80
    separations: list[str] = field(default_factory=lambda: ["none", "ffn", "deep"])
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.1, 1.0])
    quick: bool = False
    overrides: list[str] = field(default_factory=list)


# Guidance as in the demo's eval: after ~100 steps the conditioning only shows under strong CFG.
ABLATION_EVAL = {"images_per_prompt": 4, "num_caption_images": 60, "num_denoising_images": 50,
                 "text_max_new_tokens": 16, "num_text_prompts": 2, "guidance_scale": DEMO_GUIDANCE}


def _eval_kwargs(settings: AblationSettings) -> dict:
    return dict(QUICK_EVAL) if settings.quick else dict(ABLATION_EVAL)


def _arm_name(separation: str, ratio: float) -> str:
    return f"{separation}-ratio{ratio:g}"


def _prepare_data(settings: AblationSettings) -> tuple[Path, Path, list[str]]:
    """The demo's VAE and shards (made by the demo's own data steps when missing), the run config file and its
    overrides."""
    demo = DemoSettings(dataset=settings.dataset, out=settings.demo_out,
                        overrides=(list(QUICK_OVERRIDES) if settings.quick else []) + settings.overrides,
                        vae=QUICK_VAE if settings.quick else VaeSettings())
    cfg, config_path = demo_config(demo)
    data = prepare_demo_data(demo.out, settings.dataset, latent_channels=cfg.image.latent_channels,
                             resolution=demo.resolution, vae=demo.vae)
    return data.vae_dir, config_path, [f"--data.shards={data.shards}", *demo.overrides]


def _train_arm(config: Path, overrides: list[str], run_dir: Path, model_dir: Path, log: Path) -> None:
    from megafusion.demo.pipeline import choose_threads

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(choose_threads())}
    cmd = [sys.executable, "-m", "megafusion", "train", "--config", str(config), *overrides,
           f"--train.output_dir={run_dir}"]
    max_steps = int(next(o.split("=")[1] for o in overrides if o.startswith("--optim.total_steps=")))
    if trained_step(run_dir) < max_steps:
        with open(log, "a") as fh:  # the trainer's progress bar goes to the log; a line per arm goes to stdout
            proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"training {run_dir} failed (exit {proc.returncode}); see {log}")
    if not export_ready(model_dir, run_dir):
        export_run(run_dir, model_dir)


def run_ablation(settings: AblationSettings) -> dict:
    from megafusion.config import load_config
    from megafusion.eval.run import EvalSettings, evaluate

    out = settings.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    vae_dir, config_path, base_overrides = _prepare_data(settings)
    lr_image = load_config(config_path, base_overrides).optim.lr_image
    warmup = max(1, settings.steps // 10)
    eval_kwargs = _eval_kwargs(settings)
    rows = []
    arms = [(s, r) for s in settings.separations for r in settings.ratios]
    for k, (separation, ratio) in enumerate(arms, start=1):
        name = _arm_name(separation, ratio)
        arm = out / name
        arm.mkdir(parents=True, exist_ok=True)
        print(f"[ablate {k}/{len(arms)}] {name}: training {settings.steps} steps (log: {arm / 'train.log'})",
              flush=True)
        start = time.monotonic()
        overrides = [*base_overrides, f"--model.separation={separation}", f"--optim.lr_text={ratio * lr_image}",
                     f"--optim.total_steps={settings.steps}", f"--optim.warmup_steps={warmup}",
                     f"--train.save_every={settings.steps}"]
        _train_arm(config_path, overrides, arm / "run", arm / "model", arm / "train.log")
        result = evaluate(arm / "model", vae_dir, settings.dataset, arm / "eval", EvalSettings(**eval_kwargs))
        text = result["text"]
        rows.append({
            "arm": name, "separation": separation, "lr_ratio": ratio,
            "generation_accuracy": result["generation"]["accuracy"],
            "fid_in_domain": result["generation"]["fid_in_domain"],
            "caption_accuracy": result["captioning"]["accuracy"],
            "cider": result["captioning"]["cider"],
            "heldout_noise_mse": result["denoising"]["loss_own_caption"],
            "caption_gain": result["denoising"]["caption_gain"],
            "perplexity": text["perplexity"], "perplexity_base": text["perplexity_base"],
            "perplexity_change": text["perplexity"] - text["perplexity_base"],
            "greedy_identical": text["greedy_identical"],
            "text_identical": text["identical"],
            "seconds": round(time.monotonic() - start, 1),
        })
        (out / "ablation.json").write_text(json.dumps({"settings": _settings_dict(settings), "rows": rows}, indent=2))
    plot_ablation(rows, out / "ablation.png")
    (out / "ablation.md").write_text(ablation_markdown(rows, settings))
    return {"settings": _settings_dict(settings), "rows": rows}


def _settings_dict(settings: AblationSettings) -> dict:
    return {"dataset": settings.dataset, "steps": settings.steps, "separations": settings.separations,
            "ratios": settings.ratios, "quick": settings.quick, "overrides": settings.overrides}


def ablation_markdown(rows: list[dict], settings: AblationSettings) -> str:
    ev = _eval_kwargs(settings)
    lines = [
        f"# Ablation ({settings.dataset}, {settings.steps} steps per arm)", "",
        "Text score: held-out perplexity change vs the base LM (0 = text untouched) and greedy-output identity.", "",
        "Image scores: generation accuracy and in-domain FID of sampled images; held-out noise-prediction MSE "
        "(lower is better) and the caption gain (MSE with another class's caption minus with the image's own: how "
        "much the image path uses the text), both measured before samples become recognisable. Images are sampled "
        f"with CFG {ev['guidance_scale']:g} ({ev['images_per_prompt']} per prompt).", "",
        "| separation | lr_text/lr_img | gen acc | FID (in-domain) | noise MSE | caption gain | caption acc | CIDEr "
        "| perplexity change | greedy = base |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['separation']} | {r['lr_ratio']:g} | {r['generation_accuracy']:.3f} | "
                     f"{r['fid_in_domain']:.2f} | {r['heldout_noise_mse']:.4f} | {r['caption_gain']:+.4f} | "
                     f"{r['caption_accuracy']:.3f} | {r['cider']:.3f} | "
                     f"{r['perplexity_change']:+.4f} | {'yes' if r['greedy_identical'] else 'no'} |")
    lines += ["", "![ablation](ablation.png)", ""]
    return "\n".join(lines)


def plot_ablation(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"none": ("o", "tab:blue"), "ffn": ("s", "tab:orange"), "deep": ("^", "tab:green")}
    panels = {"heldout_noise_mse": "held-out noise MSE (image generation, lower is better)",
              "generation_accuracy": "generation accuracy", "caption_accuracy": "caption accuracy"}
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for ax, (key, label) in zip(axes, panels.items(), strict=True):
        for r in rows:
            marker, colour = styles.get(r["separation"], ("x", "black"))
            # Log of the perplexity ratio (= held-out loss change): a damaged text path is 1e5x worse, not 20%.
            x = math.log(r["perplexity"] / r["perplexity_base"])
            ax.scatter(x, r[key], marker=marker, color=colour, s=60, label=r["separation"])
            ax.annotate(f"{r['lr_ratio']:g}", (x, r[key]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel("held-out text loss change vs base, nats/token (0 = preserved)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), title="separation (label: lr ratio)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
