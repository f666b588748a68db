"""`megafusion ablate`: the paper's section 5 grid at demo scale, separation none/ffn/deep x lr ratio
eta_text/eta_img in {0, 0.1, 1}, each arm trained from the same base, VAE and shards for the same steps.

Text score: perplexity change on the held-out paragraphs vs the base LM (0 when the text path is untouched) and
whether greedy outputs still equal the base's. Image scores: generation accuracy, in-domain FID, caption
accuracy. Each arm trains in its own process (a fresh process group and memory per run), once per seed (the
training seed and the data order's seed; evaluation prompts and sampling seeds stay the same), and the table
gives each arm's mean and spread over its seeds."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from megafusion.demo.data_prep import VaeSettings, prepare_demo_data
from megafusion.demo.pipeline import DEMO_GUIDANCE, QUICK_EVAL, QUICK_OVERRIDES, QUICK_VAE, DemoSettings, demo_config
from megafusion.demo.report import generation_points
from megafusion.demo.runs import export_ready, export_run, trained_step


@dataclass
class AblationSettings:
    dataset: str = "digits"
    out: Path = Path("outputs/ablate")
    # Where the demo's VAE and shards are (built there first if missing).
    demo_out: Path = Path("outputs/demo")
    # Training steps per arm; None = the demo config's own (its warmup too), so the deep arm is the demo's recipe.
    steps: int | None = None
    separations: list[str] = field(default_factory=lambda: ["none", "ffn", "deep"])
    ratios: list[float] = field(default_factory=lambda: [0.0, 0.1, 1.0])
    # Each arm is trained once per seed (train.seed and data.seed).
    seeds: list[int] = field(default_factory=lambda: [0])
    quick: bool = False
    overrides: list[str] = field(default_factory=list)


# Guidance as in the demo's eval. 200 captions and 10 images per digit: with 60 and 4, one seed's caption and
# generation accuracies carried a binomial spread (~0.04 and ~0.07) as large as the gaps between arms.
# Also scored: accuracy at the paper's CFG 1.55, and FID without guidance (CFG 1), where the diversity guidance
# trades away does not dominate it.
ABLATION_EVAL = {"images_per_prompt": 10, "num_caption_images": 200, "num_denoising_images": 50,
                 "guidance_sweep": (1.0, 1.55),
                 "text_max_new_tokens": 16, "num_text_prompts": 2, "guidance_scale": DEMO_GUIDANCE}


def _eval_kwargs(settings: AblationSettings) -> dict:
    return dict(QUICK_EVAL) if settings.quick else dict(ABLATION_EVAL)


def _arm_name(separation: str, ratio: float, seed: int) -> str:
    return f"{separation}-ratio{ratio:g}-seed{seed}"


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


def _train_arm(config: Path, overrides: list[str], max_steps: int, run_dir: Path, model_dir: Path, log: Path) -> None:
    from megafusion.demo.pipeline import choose_threads

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(choose_threads())}
    cmd = [sys.executable, "-m", "megafusion", "train", "--config", str(config), *overrides,
           f"--train.output_dir={run_dir}"]
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
    run_cfg = load_config(config_path, base_overrides)
    lr_image = run_cfg.optim.lr_image
    steps = settings.steps or run_cfg.optim.total_steps
    schedule = [] if settings.steps is None else [f"--optim.total_steps={steps}",
                                                  f"--optim.warmup_steps={max(1, steps // 10)}"]
    settings = replace(settings, steps=steps)
    eval_kwargs = _eval_kwargs(settings)
    rows: list[dict] = []
    result = {"settings": _settings_dict(settings), "rows": rows, "summary": []}
    arms = [(s, r, seed) for s in settings.separations for r in settings.ratios for seed in settings.seeds]
    for k, (separation, ratio, seed) in enumerate(arms, start=1):
        name = _arm_name(separation, ratio, seed)
        arm = out / name
        arm.mkdir(parents=True, exist_ok=True)
        print(f"[ablate {k}/{len(arms)}] {name}: training {settings.steps} steps (log: {arm / 'train.log'})",
              flush=True)
        start = time.monotonic()
        overrides = [*base_overrides, f"--model.separation={separation}", f"--optim.lr_text={ratio * lr_image}",
                     *schedule, f"--train.save_every={steps}", f"--train.seed={seed}", f"--data.seed={seed}"]
        _train_arm(config_path, overrides, steps, arm / "run", arm / "model", arm / "train.log")
        result = evaluate(arm / "model", vae_dir, settings.dataset, arm / "eval", EvalSettings(**eval_kwargs))
        text = result["text"]
        sweep = generation_points(result["generation"])
        rows.append({
            "arm": name, "separation": separation, "lr_ratio": ratio, "seed": seed,
            "generation_accuracy": result["generation"]["accuracy"],
            "generation_accuracy_cfg_1.55": sweep[1.55]["accuracy"] if 1.55 in sweep else None,
            "fid_in_domain": result["generation"]["fid_in_domain"],
            "fid_in_domain_cfg_1": sweep[1.0]["fid_in_domain"] if 1.0 in sweep else None,
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
        result = {"settings": _settings_dict(settings), "rows": rows, "summary": seed_summary(rows)}
        (out / "ablation.json").write_text(json.dumps(result, indent=2))
    plot_ablation(result["summary"], out / "ablation.png")
    (out / "ablation.md").write_text(ablation_markdown(rows, settings))
    return result


def _settings_dict(settings: AblationSettings) -> dict:
    return {"dataset": settings.dataset, "steps": settings.steps, "separations": settings.separations,
            "ratios": settings.ratios, "seeds": settings.seeds, "quick": settings.quick,
            "overrides": settings.overrides}


# Scores summarised over seeds, and which way is better (for the ordering check).
SUMMARY_METRICS = {"generation_accuracy": "higher", "generation_accuracy_cfg_1.55": "higher", "fid_in_domain": "lower",
                   "fid_in_domain_cfg_1": "lower", "caption_accuracy": "higher", "heldout_noise_mse": "lower",
                   "caption_gain": "higher", "perplexity_change": "closer to 0"}
PAPER_ORDER = ("deep", "ffn", "none")


def seed_summary(rows: list[dict]) -> list[dict]:
    """One entry per (separation, lr ratio): each metric's mean and sample standard deviation over its seeds (0
    for a single seed; None when no run scored it), the seeds, and the mean perplexity ratio (for the plot's x
    axis)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["separation"], r["lr_ratio"]), []).append(r)
    summary = []
    for (separation, ratio), runs in groups.items():
        entry: dict = {"separation": separation, "lr_ratio": ratio, "seeds": [r.get("seed", 0) for r in runs]}
        for key in SUMMARY_METRICS:
            values = [float(r[key]) for r in runs if r.get(key) is not None]
            entry[key] = {"mean": statistics.fmean(values),
                          "std": statistics.stdev(values) if len(values) > 1 else 0.0} if values else None
        entry["log_perplexity_ratio"] = statistics.fmean(math.log(r["perplexity"] / r["perplexity_base"])
                                                         for r in runs)
        summary.append(entry)
    return summary


def paper_ordering(summary: list[dict], ratio: float = 0.0) -> dict[str, bool | None]:
    """Per metric: whether the means at this lr ratio rank deep > ffn > none (better first), as the paper's
    section 5 does; None when an arm is missing."""
    means = {e["separation"]: e for e in summary if e["lr_ratio"] == ratio}
    result: dict[str, bool | None] = {}
    for key, better in SUMMARY_METRICS.items():
        if key == "perplexity_change" or not all(s in means and means[s][key] for s in PAPER_ORDER):
            continue
        values = [means[s][key]["mean"] for s in PAPER_ORDER]
        ranked = values[0] > values[1] > values[2] if better == "higher" else values[0] < values[1] < values[2]
        result[key] = ranked
    return result


def ablation_markdown(rows: list[dict], settings: AblationSettings) -> str:
    ev = _eval_kwargs(settings)
    lines = [
        f"# Ablation ({settings.dataset}, {settings.steps} steps per arm)", "",
        "Text score: held-out perplexity change vs the base LM (0 = text untouched) and greedy-output identity.", "",
        "Image scores: generation accuracy and in-domain FID of sampled images; held-out noise-prediction MSE "
        "(lower is better) and the caption gain (MSE with another class's caption minus with the image's own: how "
        "much the image path uses the text), both measured before samples become recognisable. Images are sampled "
        f"with CFG {ev['guidance_scale']:g} ({ev['images_per_prompt']} per prompt); accuracy also at CFG 1.55 and FID "
        "also at CFG 1 (no guidance), where guidance's loss of diversity does not dominate it.", "",
    ]
    summary = seed_summary(rows)
    lines += ["Mean ± standard deviation over seeds:", "",
              "| separation | lr_text/lr_img | seeds | gen acc | gen acc CFG 1.55 | FID (in-domain) | FID CFG 1 "
              "| caption acc | noise MSE | caption gain | perplexity change |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        cells = [f"{e[k]['mean']:.4g} ± {e[k]['std']:.2g}" if e[k] else "n/a" for k in SUMMARY_METRICS]  # header order
        lines.append(f"| {e['separation']} | {e['lr_ratio']:g} | {len(e['seeds'])} | " + " | ".join(cells) + " |")
    ordering = paper_ordering(summary)
    if ordering:
        lines += ["", "The paper's ordering deep > ffn > none at lr ratio 0 (means): "
                  + ", ".join(f"{k}: {'holds' if ok else 'does not hold'}" for k, ok in ordering.items()) + "."]
    lines += [
        "", "Every run:", "",
        "| separation | lr_text/lr_img | seed | gen acc | gen acc CFG 1.55 | FID (in-domain) | FID CFG 1 | noise MSE "
        "| caption gain | caption acc | CIDEr | perplexity change | greedy = base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def optional(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    for r in rows:
        lines.append(f"| {r['separation']} | {r['lr_ratio']:g} | {r.get('seed', 0)} | {r['generation_accuracy']:.3f} | "
                     f"{optional(r.get('generation_accuracy_cfg_1.55'), '.3f')} | {r['fid_in_domain']:.2f} | "
                     f"{optional(r.get('fid_in_domain_cfg_1'), '.2f')} | "
                     f"{r['heldout_noise_mse']:.4f} | {r['caption_gain']:+.4f} | "
                     f"{r['caption_accuracy']:.3f} | {r['cider']:.3f} | "
                     f"{r['perplexity_change']:+.4f} | {'yes' if r['greedy_identical'] else 'no'} |")
    lines += ["", "![ablation](ablation.png)", ""]
    return "\n".join(lines)


def plot_ablation(summary: list[dict], path: Path) -> Path:
    """Each arm's mean over seeds with its standard deviation as error bars, against the text loss change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"none": ("o", "tab:blue"), "ffn": ("s", "tab:orange"), "deep": ("^", "tab:green")}
    panels = {"heldout_noise_mse": "held-out noise MSE (lower is better)",
              "generation_accuracy": "generation accuracy", "caption_accuracy": "caption accuracy"}
    xs = [e["log_perplexity_ratio"] for e in summary]
    # With every arm's text untouched (lr ratio 0) the text-loss axis is one point: spread the arms by separation.
    by_separation = max(xs) - min(xs) < 1e-9
    names = list(dict.fromkeys(e["separation"] for e in summary))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for ax, (key, label) in zip(axes, panels.items(), strict=True):
        for e in summary:
            marker, colour = styles.get(e["separation"], ("x", "black"))
            # Log of the perplexity ratio (= held-out loss change): a damaged text path is 1e5x worse, not 20%.
            x = names.index(e["separation"]) if by_separation else e["log_perplexity_ratio"]
            y = e[key]["mean"]
            ax.errorbar(x, y, yerr=e[key]["std"], fmt=marker, color=colour, markersize=7, capsize=4,
                        label=e["separation"])
            ax.annotate(f"{e['lr_ratio']:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if by_separation:
            ax.set_xticks(range(len(names)), names)
            ax.set_xlim(-0.5, len(names) - 0.5)
            ax.set_xlabel(f"separation (text loss change {xs[0]:+.2g} nats/token in every arm)")
        else:
            ax.set_xlabel("held-out text loss change vs base, nats/token (0 = preserved)")
        ax.set_ylabel(f"{label}\n(mean ± std over seeds)")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), title="separation (label: lr ratio)", fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
