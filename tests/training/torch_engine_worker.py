"""Worker for test_torch_engine (launched by torchrun): `megafusion train ARGS` in-process (what the CLI runs), then,
on the trained (tensor-parallel) model itself: whether every frozen text weight is bitwise the base's, and its
outputs on a fixed batch (text logits and noise predictions), which rank 0 saves for the comparison with the
exported model."""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import megafusion.training.trainer as trainer
from megafusion.config import load_config
from megafusion.model import LlamaFusion
from megafusion.training.run_setup import TrainingSetup


def full_of(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def fixed_batch(model: LlamaFusion, seed: int = 123) -> dict[str, torch.Tensor]:
    """Two rows: text, one image, text; and text only."""
    g = torch.Generator().manual_seed(seed)
    vocab, n = model.arch.vocab_size, model.image_config.tokens_per_image
    text = lambda k: torch.randint(0, vocab, (k,), generator=g).tolist()  # noqa: E731
    ids = [text(5) + [model.boi_id] + [0] * n + [model.eoi_id] + text(9), text(16 + n)]
    mod = [[0] * 6 + [1] * n + [0] * 10, [0] * (16 + n)]
    c, s = model.image_config.latent_channels, model.image_config.latent_size
    return {"input_ids": torch.tensor(ids), "modality": torch.tensor(mod),
            "images": torch.randn((1, c, s, s), generator=g), "timesteps": torch.tensor([300])}


@torch.no_grad()
def outputs(model: LlamaFusion, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = model(batch["input_ids"], batch["modality"], images=batch["images"], timesteps=batch["timesteps"])
    return {k: full_of(getattr(out, k)).float() for k in ("logits", "special_logits", "noise_pred")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--config", required=True)
    args, overrides = p.parse_known_args()
    cfg = load_config(args.config, overrides)
    runs: list[TrainingSetup] = []
    setup = trainer.setup_training
    trainer.setup_training = lambda c: runs.append(setup(c)) or runs[-1]
    trainer.train(cfg, progress=False)
    model = runs[0].model
    base = LlamaFusion.from_llama(runs[0].ctx.base, cfg.model.separation, cfg.image, cfg.unet)
    base_params = dict(base.named_parameters())
    frozen = [(n.replace("_checkpoint_wrapped_module.", ""), p) for n, p in model.named_parameters()
              if not p.requires_grad]
    text_bitwise = bool(frozen) and all(torch.equal(full_of(p), base_params[n]) for n, p in frozen)
    result = outputs(model, fixed_batch(model))
    if dist.get_rank() == 0:
        torch.save(result, args.out + ".pt")
        with open(args.out, "w") as f:
            json.dump({"text_bitwise_unchanged": text_bitwise, "frozen": len(frozen),
                       "frozen_text_only": all(LlamaFusion.parameter_group(n) == "text" for n, _ in frozen)}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
