"""The demo's report: report.json (every number), report.md (readable, with the figures) and loss_curves.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from megafusion.config import config_to_dict
from megafusion.config.schema import MegaFusionConfig

# Issue 16's targets for the digits demo (chance is 10% for both accuracies): name -> (bound, ">=" or "<=").
# Generation accuracy is the weaker judge's (an image counts only when that judge confidently sees the asked
# digit), on the test split.
TARGETS: dict[str, tuple[float, str]] = {
    "generation_accuracy_cfg_le_5": (0.80, ">="),
    "generation_accuracy_cfg_1.55": (0.50, ">="),
    "fid_in_domain_over_floor": (2.0, "<="),
    # The same bound at the paper's CFG, where accuracy has its own target: the guidance trade-off in one line.
    "fid_in_domain_over_floor_cfg_1.55": (2.0, "<="),
    "caption_accuracy": (0.95, ">="),
    "wall_seconds": (20 * 60, "<="),
}


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl records, one per step: a resumed run appends again from its checkpoint, the last wins."""
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(records: list[dict], path: Path) -> Path | None:
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    window = max(1, len(records) // 25)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("loss", "lm_loss", "diffusion_loss"),
                              ("total  L_LM + lambda L_DDPM", "L_LM (captions)", "L_DDPM (noise MSE)"), strict=True):
        values = [r[key] for r in records]
        ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
        ax.plot(steps, _smooth(values, window), color="tab:blue", linewidth=1.8, label=f"mean of {window}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_summary(records: list[dict]) -> dict:
    if not records:
        return {}
    tail = records[-min(len(records), 20):]
    times = [r["step_time_s"] for r in records[1:]] or [records[0]["step_time_s"]]  # step 1 includes warm-up
    return {
        "steps": records[-1]["step"],
        "final_loss_mean_last_20": sum(r["loss"] for r in tail) / len(tail),
        "final_lm_loss_mean_last_20": sum(r["lm_loss"] for r in tail) / len(tail),
        "final_diffusion_loss_mean_last_20": sum(r["diffusion_loss"] for r in tail) / len(tail),
        "first_loss": records[0]["loss"],
        "mean_step_time_s": sum(times) / len(times),
        "mean_tokens_per_s": sum(r["text_tokens_per_s"] + r["image_tokens_per_s"] for r in records[1:] or records)
        / max(1, len(records[1:] or records)),
        "peak_memory_gb": max(r.get("peak_memory_gb") or 0 for r in records),
    }


def generation_points(gen: dict) -> dict[float, dict]:
    """Every scored guidance scale -> its point (the sweep and the headline scale)."""
    points = {p["guidance_scale"]: p for p in gen.get("guidance_sweep", [])}
    if gen.get("guidance_scale") is not None:
        points.setdefault(gen["guidance_scale"], gen)
    return points


def _target(value: Any, name: str) -> dict:
    bound, op = TARGETS[name]
    met = None if value is None else (value >= bound if op == ">=" else value <= bound)
    return {"value": value, "target": bound, "direction": op, "met": met}


def _targets(results: dict, wall: float, dataset: str) -> dict:
    text = results.get("text") or {}
    gen, cap = results["generation"], results["captioning"]
    points = generation_points(gen)
    low = [p["accuracy"] for scale, p in points.items() if scale <= 5.0]
    floor = results["classifier"].get("fid_real_floor") or results["classifier"]["fid_real_train_vs_test"]
    out = {
        # The best scale up to 5: the issue asks for the target "at CFG 5 or lower".
        "generation_accuracy_cfg_le_5": _target(max(low) if low else None, "generation_accuracy_cfg_le_5"),
        "generation_accuracy_cfg_1.55": _target(points[1.55]["accuracy"] if 1.55 in points else None,
                                                "generation_accuracy_cfg_1.55"),
        "fid_in_domain_over_floor": _target(gen["fid_in_domain"] / floor if floor else None,
                                            "fid_in_domain_over_floor"),
        "fid_in_domain_over_floor_cfg_1.55": _target(
            points[1.55]["fid_in_domain"] / floor if floor and 1.55 in points else None,
            "fid_in_domain_over_floor_cfg_1.55"),
        "caption_accuracy": _target(cap["accuracy"], "caption_accuracy"),
        "text_identical_to_base": {"value": text.get("identical"), "target": True, "direction": "==",
                                   "met": text.get("identical") is True},
        "wall_seconds": _target(wall, "wall_seconds"),
    }
    if dataset != "digits":  # the issue sets accuracy and FID targets for digits only
        for key in ("generation_accuracy_cfg_le_5", "generation_accuracy_cfg_1.55", "fid_in_domain_over_floor",
                    "fid_in_domain_over_floor_cfg_1.55", "caption_accuracy"):
            out[key]["target"] = out[key]["met"] = None
    return out


def _weights_note(train_config: dict) -> str:
    decay = train_config.get("ema_decay", 0.0)
    return f", evaluated with the moving average of its weights (train.ema_decay {decay})" if decay > 0 else ""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _probe_rows(probe: dict | None) -> list[str]:
    """eval/conditioning.py's numbers: how much of the caption reaches the U-Net up (absent in old reports)."""
    if not probe:
        return []
    from megafusion.eval.conditioning import TOP_DIMS

    share = probe[f"top{TOP_DIMS}_dims_energy_share"]
    return [
        f"| caption swap at t={probe['timestep']}: change of the image tokens' last hidden states / of the noise "
        f"prediction | {probe['caption_swap_hidden_change']:.2%} / {probe['caption_swap_noise_change']:.2%} |",
        f"| image tokens' last hidden states: RMS / energy share of their {TOP_DIMS} largest "
        f"dimensions | {probe['image_hidden_rms']:.1f} / {share:.0%} |",
    ]


def _markdown(report: dict) -> str:
    r, ctx, train = report["eval"], report["context"], report["training"]
    gen, cap, clf, text = r["generation"], r["captioning"], r["classifier"], r.get("text") or {}
    den = r.get("denoising") or {}
    inception = "computed" if r["inception_fid"]["computed"] else "skipped: " + r["inception_fid"]["reason"]
    split = r.get("split", "test")
    floor = clf.get("fid_real_floor", clf["fid_real_train_vs_test"])
    lines = [
        f"# megafusion demo: {ctx['dataset']}",
        "",
        f"LlamaFusion on `{ctx['base']}` ({report['config']['model']['separation']} separation, "
        f"lr_text = {report['config']['optim']['lr_text']}), trained on CPU for {train.get('steps', 'n/a')} steps"
        f"{_weights_note(report['config']['train'])}. "
        f"Wall time of this run: {ctx['wall_seconds'] / 60:.1f} min ({ctx.get('torch_threads')} torch thread(s); "
        f"1-minute load average at start {ctx.get('load_average_at_start')}).",
        "",
        _machine_line(report),
        "",
        "## Headline numbers",
        "",
        "| metric | value | target | met |",
        "|---|---|---|---|",
    ]
    for name, t in report["targets"].items():
        bound = "n/a" if t["target"] is None else f"{t.get('direction', '>=')} {_fmt(t['target'])}"
        lines.append(f"| {name} | {_fmt(t['value'])} | {bound} | {_fmt(t['met'])} |")
    lines += ["", *_provenance(r)]
    lines += [
        "",
        "| more numbers | value |",
        "|---|---|",
        f"| in-domain classifier accuracy on real held-out images | {_fmt(clf['test_accuracy'])} |",
        f"| generated images judged correct by the classifier label | {_fmt(gen['classifier_label_accuracy'])} |",
        f"| FID in the classifier's feature space (generated vs real {split}, CFG {gen['guidance_scale']}) | "
        f"{_fmt(gen['fid_in_domain'], 2)} |",
        f"| same FID for real train vs real {split} images (floor at this sample size) | {_fmt(floor, 2)} |",
        f"| Inception FID | {inception} |",
        f"| caption CIDEr (CIDEr-D, x10 scale) | {_fmt(cap['cider'])} |",
        f"| held-out noise-prediction MSE: own caption / other class's caption / no caption | "
        f"{_fmt(den.get('loss_own_caption'), 4)} / {_fmt(den.get('loss_other_caption'), 4)} / "
        f"{_fmt(den.get('loss_no_caption'), 4)} |",
        *_probe_rows(den.get("conditioning_probe")),
        f"| greedy text outputs identical to base | {_fmt(text.get('greedy_identical'))} |",
        f"| max abs log-prob difference vs base | {_fmt(text.get('max_abs_logprob_diff'), 8) if text else 'n/a'} |",
        f"| perplexity on held-out paragraphs (fused / base) | {_fmt(text.get('perplexity'))} / "
        f"{_fmt(text.get('perplexity_base'))} |",
        "",
        f"Generation: {gen['num_images']} images ({gen['images_per_prompt']} per prompt), {gen['sampler'].upper()} "
        f"{gen['num_steps']} steps ({gen.get('timestep_spacing', 'leading')} timesteps), CFG {gen['guidance_scale']}. "
        f"Captioning: {cap['num_images']} held-out images, greedy. CIDEr tokenizer: {cap['cider_tokenizer']}.",
        "",
        *_generation_tables(r, floor),
    ]
    lines += [
        "## Training",
        "",
        "![loss curves](loss_curves.png)",
        "",
        f"Steps {train.get('steps')}, mean step time {_fmt(train.get('mean_step_time_s'), 2)} s, "
        f"{_fmt(train.get('mean_tokens_per_s'), 0)} tokens/s, final loss (mean of last 20 steps) "
        f"{_fmt(train.get('final_loss_mean_last_20'))} (LM {_fmt(train.get('final_lm_loss_mean_last_20'))}, "
        f"diffusion {_fmt(train.get('final_diffusion_loss_mean_last_20'))}). "
        f"VAE: reconstruction PSNR {_fmt(ctx['vae_training'].get('recon_psnr'), 1)} dB on held-out images.",
        "",
        "## Generated images",
        "",
        f"![generated images]({gen.get('overview_png', 'generated.png')})",
        "",
        "| prompt | " + " | ".join(f"accuracy ({n})" for n in gen["judges"]) + " | grid |",
        "|---|" + "---|" * len(gen["judges"]) + "---|",
    ]
    for i, p in enumerate(gen["per_prompt"]):
        accs = " | ".join(_fmt(p["accuracy_by_judge"][n], 2) for n in gen["judges"])
        lines.append(f"| {p['prompt']} | {accs} | [png](eval/generated/prompt_{i:02d}.png) |")
    lines += ["", "## Held-out images with generated captions", "", f"![captions]({cap.get('sheet_png', '')})", "",
              "| truth | generated | correct |", "|---|---|---|"]
    for ex in cap["examples"][:20]:
        lines.append(f"| {ex['truth']} | {ex['generated']} | {_fmt(ex['correct'])} |")
    if text:
        lines += ["", "## Text: fused model vs base LM (greedy)", "", "| prompt | fused | base | same tokens |",
                  "|---|---|---|---|"]
        for row in text["prompts"]:
            clean = [" ".join(str(row[k]).split()).replace("|", "\\|") for k in ("prompt", "fused", "base")]
            lines.append(f"| {clean[0]} | {clean[1]} | {clean[2]} | {_fmt(row['same_tokens'])} |")
    lines += ["", "## Time per step (seconds)", "", "| step | seconds | reused |", "|---|---|---|"]
    for name, sec in ctx["steps_seconds"].items():
        lines.append(f"| {name} | {sec} | {_fmt(ctx['steps_reused'].get(name))} |")
    lines.append("")
    return "\n".join(lines)


def _provenance(r: dict) -> list[str]:
    """Which split the numbers come from, with which prompts and seed, and which settings were chosen on what."""
    gen, split = r["generation"], r.get("split", "test")
    held = r["classifier"].get("heldout_images", r["classifier"]["test_images"])
    lines = [f"Every number in this report comes from the **{split}** split ({held} held-out real images; "
             f"prompts \"{gen.get('prompt_phrasing', '?')}\", generation seed {gen.get('seed', '?')})."
             + (" Settings are chosen on the val split, with other prompts and seeds (`megafusion eval --split "
                "val`), never on these numbers." if split == "test" else
                " This is the split settings are chosen on; the report's numbers come from test.")]
    chosen = (r.get("settings") or {}).get("chosen") or {}
    if chosen:
        lines += ["", "| setting | chosen on |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in chosen.items()]
    return lines


def _generation_tables(r: dict, floor: float) -> list[str]:
    """The judges, accuracy per judge at each CFG scale with FID beside its floor, the out-of-template phrasing,
    and the confusion matrices."""
    gen, judges, split = r["generation"], r["generation"].get("judges", {}), r.get("split", "test")
    names = list(judges)
    threshold = gen.get("confidence_threshold")
    lines = [f"Judges: an image counts as correct only when the judge gives the asked class probability >= "
             f"{threshold} (blobs and flat fields fall into a \"not a digit\" class or stay below it). Their own "
             "accuracy on real held-out images, under that rule and by plain argmax, and on the same images after "
             "a VAE round trip (the best a generator could score):", "",
             f"| judge | kind | real val, confident | real test, confident | real test, argmax | real {split} "
             "through the VAE, confident |",
             "|---|---|---|---|---|---|"]
    for name in names:
        rec = (r.get("judges") or {}).get(name, {})
        lines.append(f"| {name} | {judges[name]} | {_fmt(rec.get('val_confident_accuracy'))} | "
                     f"{_fmt(rec.get('test_confident_accuracy'))} | {_fmt(rec.get('test_accuracy'))} | "
                     f"{_fmt(rec.get(f'{split}_vae_roundtrip_confident_accuracy'))} |")
    lines.append("")
    points = sorted(generation_points(gen).items())
    if points:
        lines += ["Generation accuracy by classifier-free guidance scale (same prompts and seed; 1 = without CFG, "
                  "1.55 = the paper's CFG); the last accuracy column is the in-domain classifier's plain argmax, "
                  "without the confidence rule:", "",
                  "| CFG scale | " + " | ".join(f"accuracy ({n})" for n in names)
                  + " | argmax (mlp) | in-domain FID | FID floor (real vs real) |",
                  "|---|" + "---|" * len(names) + "---|---|---|"]
        for scale, p in points:
            accs = " | ".join(_fmt(p["accuracy_by_judge"].get(n)) for n in names)
            lines.append(f"| {scale:g} | {accs} | {_fmt(p['classifier_label_accuracy'])} | "
                         f"{_fmt(p['fid_in_domain'], 2)} | {_fmt(floor, 2)} |")
        lines.append("")
    oot = gen.get("out_of_template")
    if oot:
        accs = ", ".join(f"{n} {_fmt(oot['accuracy_by_judge'].get(n))}" for n in names)
        lines += [f"Out-of-template phrasing \"{oot['prompt_phrasing']}\" (no training caption reads like it), CFG "
                  f"{oot['guidance_scale']}: accuracy {accs}; in-domain FID {_fmt(oot['fid_in_domain'], 2)}.", ""]
    if gen.get("confusion_png"):
        lines += ["Per digit: asked digit (rows) x the digit the judge confidently sees (columns; ? = not confident "
                  "or not a digit), one matrix per judge and CFG scale, and for the out-of-template phrasing:", "",
                  f"![confusion matrices]({gen['confusion_png']})", ""]
    return lines


def _relink(results: dict, prefix: str) -> None:
    # Figures live under eval/; links in report.md are relative to the output directory.
    for section, key in (("generation", "overview_png"), ("generation", "confusion_png"),
                         ("captioning", "sheet_png")):
        if key in results[section]:
            results[section][key] = f"{prefix}/{results[section][key]}"


def _machine_line(report: dict) -> str:
    """CPU, threads and the precision choices (with their probe rates): numbers mean little without them."""
    cpu = report["context"].get("cpu") or {}
    flags = ", ".join(cpu.get("flags", [])) or "none of avx2/avx512_bf16/amx"
    parts = [f"Machine: CPU {cpu.get('model', 'unknown')} (flags: {flags}), "
             f"{report['context'].get('torch_threads')} torch thread(s)."]
    for name, choice in (("training", report.get("training_precision")),
                         ("image generation/captioning", report["eval"].get("image_precision"))):
        if choice:
            parts.append(f"{name.capitalize()} precision: {choice['precision']} (asked: {choice['requested']}; "
                         f"{choice['reason']}).")
    return " ".join(parts)


def write_report(out: Path, cfg: MegaFusionConfig, context: dict, results: dict, metrics_path: Path) -> dict:
    records = read_metrics(metrics_path)
    plot_losses(records, out / "loss_curves.png")
    _relink(results, "eval")
    # Each training process writes its precision choice into its first record (a resumed run: the last one).
    choices = [r["precision"] for r in records if "precision" in r]
    report = {
        "context": context,
        "config": config_to_dict(cfg),
        "training": training_summary(records),
        "training_precision": choices[-1] if choices else None,
        "targets": _targets(results, context["wall_seconds"], context["dataset"]),
        "eval": results,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    return report
