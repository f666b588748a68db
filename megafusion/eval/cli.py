"""`megafusion eval`: the command-line face of megafusion.eval (heavy imports happen inside the handler)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from megafusion.inference.timesteps import add_spacing_argument


def add_eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a trained LlamaFusion: image generation, captioning, text identity")
    p.add_argument("--model", required=True, help="LlamaFusion directory (megafusion export / save_pretrained)")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL directory the latents were made with")
    p.add_argument("--dataset", required=True, choices=("digits", "shapes"))
    p.add_argument("--out", default=None, help="write eval.json and the PNG figures here")
    p.add_argument("--base", default=None, help="base LM (default: the one recorded in the model)")
    p.add_argument("--split", default="test", choices=("val", "test"),
                   help="held-out split every number comes from: val (own prompts and seeds) to choose settings on, "
                        "test to report")
    p.add_argument("--images-per-prompt", type=int, default=10)
    p.add_argument("--num-prompts", type=int, default=10, help="prompts for shapes (digits: its 10 classes)")
    p.add_argument("--sampler", default="ddim", choices=("ddpm", "ddim"))
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    add_spacing_argument(p)
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--no-cfg", action="store_true")
    p.add_argument("--cfg-sweep", default="", help="more CFG scales to score, e.g. 1,1.55,5 (1 = no guidance)")
    p.add_argument("--out-of-template", action="store_true",
                   help="one more generation pass at --cfg with a phrasing no training caption uses")
    p.add_argument("--confidence", type=float, default=0.7,
                   help="a judge counts an image as the asked class only at this probability or more")
    p.add_argument("--caption-images", type=int, default=200, help="held-out images to caption")
    p.add_argument("--skip-text", action="store_true", help="skip the text identity and perplexity checks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lm-eval-tasks", default=None,
                   help="also run lm-evaluation-harness tasks, e.g. hellaswag,piqa,siqa,winogrande (needs the "
                        "`eval` extra and, for those tasks, internet access to their datasets)")
    p.add_argument("--lm-eval-include", default=None, help="directory of extra lm-eval task YAMLs")
    p.add_argument("--lm-eval-limit", type=float, default=None, help="examples per lm-eval task")


def run_lm_eval(model: str, tasks: list[str], include: str | None, limit: float | None,
                batch_size: int = 8) -> dict:
    """lm-eval's simple_evaluate on the `megafusion` adapter; returns the per-task results."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ValueError("lm-eval is not installed: pip install 'megafusion[eval]'") from err
    import megafusion.eval.lm_eval_adapter  # noqa: F401  (registers "megafusion")

    manager = TaskManager(include_path=include) if include else TaskManager()
    results = lm_eval.simple_evaluate(model="megafusion", model_args={"pretrained": model}, tasks=tasks,
                                      task_manager=manager, limit=limit, batch_size=batch_size, log_samples=False)
    return json.loads(json.dumps(results["results"], default=str))


def _scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise ValueError(f"--cfg-sweep: expected comma-separated numbers, got {text!r}") from err


def run_eval(args: argparse.Namespace) -> int:
    from megafusion.eval.run import EVAL_JSON, EvalSettings, evaluate

    settings = EvalSettings(
        split=args.split, out_of_template=args.out_of_template, confidence_threshold=args.confidence,
        images_per_prompt=args.images_per_prompt, num_prompts=args.num_prompts, sampler=args.sampler,
        timestep_spacing=args.timestep_spacing,
        num_steps=args.steps, guidance_scale=None if args.no_cfg else args.cfg,
        num_caption_images=args.caption_images, skip_text=args.skip_text, seed=args.seed,
        guidance_sweep=_scales(args.cfg_sweep),
    )
    result = evaluate(args.model, args.vae, args.dataset, args.out, settings, base=args.base)
    if args.lm_eval_tasks:
        tasks = [t.strip() for t in args.lm_eval_tasks.split(",") if t.strip()]
        result["lm_eval"] = run_lm_eval(args.model, tasks, args.lm_eval_include, args.lm_eval_limit)
        if args.out:
            from pathlib import Path

            (Path(args.out) / EVAL_JSON).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary(result), indent=2))
    return 0


def summary(result: dict) -> dict:
    """The headline numbers of an evaluation."""
    text = result.get("text") or {}
    gen = result["generation"]
    out = {
        "split": result["split"],
        "classifier_test_accuracy": result["classifier"]["test_accuracy"],
        "judges_confident_accuracy_on_real": {name: r[f"{result['split']}_confident_accuracy"]
                                              for name, r in result["judges"].items()},
        # The weaker judge's; each judge's is under generation_accuracy_by_judge.
        "generation_accuracy": gen["accuracy"],
        "generation_accuracy_by_judge": gen["accuracy_by_judge"],
        "guidance_scale": gen["guidance_scale"],
        "fid_in_domain": gen["fid_in_domain"],
        "fid_real_floor": result["classifier"]["fid_real_floor"],
        "caption_accuracy": result["captioning"]["accuracy"],
        "cider": result["captioning"]["cider"],
        "heldout_noise_mse": result["denoising"]["loss_own_caption"],
        "caption_gain": result["denoising"]["caption_gain"],
        "caption_swap_noise_change": result["denoising"]["conditioning_probe"]["caption_swap_noise_change"],
        "text_identical_to_base": text.get("identical"),
        "max_abs_logprob_diff": text.get("max_abs_logprob_diff"),
        "perplexity": text.get("perplexity"),
        "perplexity_base": text.get("perplexity_base"),
    }
    if gen.get("guidance_sweep"):
        out["generation_by_guidance"] = {f"{p['guidance_scale']:g}": {"accuracy": p["accuracy"],
                                                                     "accuracy_by_judge": p["accuracy_by_judge"],
                                                                     "fid_in_domain": p["fid_in_domain"]}
                                         for p in gen["guidance_sweep"]}
    if "out_of_template" in gen:
        oot = gen["out_of_template"]
        out["out_of_template"] = {"prompt_phrasing": oot["prompt_phrasing"], "guidance_scale": oot["guidance_scale"],
                                  "accuracy": oot["accuracy"], "accuracy_by_judge": oot["accuracy_by_judge"]}
    if "lm_eval" in result:
        out["lm_eval"] = result["lm_eval"]
    return out
