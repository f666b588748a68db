"""Greedy generation on the real SmolLM2-135M-Instruct equals transformers' generate, token for token, before and
after image training with the text path frozen (lr_text = 0)."""

import pytest
import torch
from transformers import LlamaForCausalLM

from megafusion.config.schema import ImageConfig, OptimConfig, UNetConfig
from megafusion.data_pipeline.tokenizer import load_tokenizer
from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.inference.sampling import SamplingConfig
from megafusion.inference.text import generate_tokens
from megafusion.inference.tokens import encode_prompt, stop_token_ids
from megafusion.model import LlamaFusion
from megafusion.training.objective import TransfusionObjective
from megafusion.training.optim import build_optimizer

pytestmark = pytest.mark.slow

SMALL_IMAGE = ImageConfig(latent_channels=4, latent_size=8, patch_size=2)
SMALL_UNET = UNetConfig(channels=32, num_blocks=2, norm_groups=8, time_embed_dim=64)
NEW_TOKENS = 20


def _train_image_path(model: LlamaFusion, caption: list[int], steps: int = 2) -> None:
    opt = build_optimizer(model, OptimConfig(lr_text=0.0, lr_image=1e-3, warmup_steps=0, total_steps=10))
    n = SMALL_IMAGE.tokens_per_image
    ids = torch.tensor([caption + [model.boi_id] + [0] * n + [model.eoi_id]])
    modality = torch.zeros_like(ids)
    modality[:, len(caption) + 1 : len(caption) + 1 + n] = 1
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    objective = TransfusionObjective(DDPMSchedule(), 5.0)
    model.train()
    for step in range(steps):
        out = objective(model, ids, modality, latents=latents, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()


def test_greedy_generation_equals_transformers_before_and_after_image_training(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    prompts = [encode_prompt(tok, "What is the capital of France?", chat=True),
               encode_prompt(tok, "The three primary colours are", chat=False)]
    ref = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 do_sample=False, max_new_tokens=NEW_TOKENS)[0, len(p):].tolist() for p in prompts]
    del ref
    assert "Paris" in tok.decode(expected[0])

    model = LlamaFusion.from_llama(smollm2_dir, image=SMALL_IMAGE, unet=SMALL_UNET).eval()
    stop = stop_token_ids(model, tok)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    for p, exp in zip(prompts, expected, strict=True):
        assert generate_tokens(model, [[p]], sampling, stop) == [exp]

    _train_image_path(model, prompts[1][:8])
    moved = model.layers[0].attn_in.image.q_proj.weight
    assert not torch.equal(moved, model.layers[0].attn_in.text.q_proj.weight), "the guard: image path trained"
    for p, exp in zip(prompts, expected, strict=True):
        assert generate_tokens(model, [[p]], sampling, stop) == [exp]
