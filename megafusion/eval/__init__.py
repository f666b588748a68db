"""Evaluation of a trained LlamaFusion on the demo datasets (`megafusion eval`).

Modules (one job each): `classifier` (in-domain image classifier and its features), `judges` (who decides that a
generated image shows the asked class: two classifiers of different kinds under a confidence rule, or the shapes
rule checker; confusion matrices), `fid` (Frechet distance), `captions` (caption accuracy, CIDEr), `datasets`
(prompts and seeds per split, what "correct" means for digits / shapes), `model_io` (image generation and
captioning in the training sequence layout), `text` (text identity with the base LM, perplexity), `heldout_text`
(fixed paragraphs), `lm_eval_adapter` (lm-evaluation-harness model, needs the `eval` extra), `run` (the whole
evaluation, figures and eval.json), `cli`.

Heavy modules are imported by their users, so `megafusion --help` stays cheap.
"""
