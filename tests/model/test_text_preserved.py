"""Text-only behaviour equals transformers' LlamaForCausalLM (the independent reference)."""

import pytest
import torch

from megafusion.config.schema import OptimConfig
from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.model import LlamaFusion
from megafusion.training.objective import TransfusionObjective
from megafusion.training.optim import build_optimizer
from tests.helpers import TINY_IMAGE, TINY_LLAMAS, TINY_UNET, mixed_batch, save_tiny_llama

SEPARATIONS = ("deep", "ffn", "none")


def _load(path, separation):
    return LlamaFusion.from_llama(path, separation=separation, image=TINY_IMAGE, unet=TINY_UNET).eval()


@pytest.mark.parametrize("variant", sorted(TINY_LLAMAS))
@pytest.mark.parametrize("separation", SEPARATIONS)
def test_text_logits_equal_transformers(tmp_path, variant, separation):
    ref = save_tiny_llama(tmp_path, variant)
    ids = torch.randint(0, ref.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = _load(tmp_path, separation)(input_ids=ids).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_llama3_rope_scaling_is_applied(tmp_path):
    """Guards the test above: dropping the llama3 scaling must change the logits visibly."""
    ref = save_tiny_llama(tmp_path, "llama3-rope")
    ids = torch.randint(0, ref.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    model = _load(tmp_path, "deep")
    model.arch.rope_scaling = None
    from megafusion.model.rope import RotaryEmbedding

    model.rotary = RotaryEmbedding(model.arch)
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - ref(ids).logits).abs().max()
    assert diff > 1e-3


def test_packed_documents_match_separate_reference_runs(tmp_path):
    """Two packed documents: each one's logits equal the reference run on that document alone."""
    ref = save_tiny_llama(tmp_path, "gqa-untied")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 97, (1, 20), generator=g), torch.randint(0, 97, (1, 28), generator=g)
    packed = torch.cat((a, b), dim=1)
    doc_ids = torch.tensor([[0] * 20 + [1] * 28])
    with torch.no_grad():
        got = _load(tmp_path, "deep")(input_ids=packed, doc_ids=doc_ids).logits
        torch.testing.assert_close(got[:, :20], ref(a).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[:, 20:], ref(b).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("separation", SEPARATIONS)
def test_caption_prefix_before_image_equals_reference(tmp_path, separation):
    """In a caption-first sequence the causal mask hides the image from the caption: its logits are the LM's."""
    ref = save_tiny_llama(tmp_path, "gqa-untied")
    batch = mixed_batch(97, TINY_IMAGE)
    with torch.no_grad():
        out = _load(tmp_path, separation)(**batch)
        expected = ref(batch["input_ids"][:1, :5]).logits
    torch.testing.assert_close(out.logits[:1, :5], expected, atol=1e-5, rtol=0)


def test_training_with_frozen_text_leaves_text_bitwise_unchanged(tmp_path):
    ref = save_tiny_llama(tmp_path, "gqa-untied")
    model = _load(tmp_path, "deep").train()
    text_before = {n: p.detach().clone() for n, p in model.grouped_parameters()["text"]}
    image_before = {n: p.detach().clone() for n, p in model.grouped_parameters()["image"]}
    opt = build_optimizer(model, OptimConfig(lr_text=0.0, lr_image=1e-2, warmup_steps=0, total_steps=10))
    objective = TransfusionObjective(DDPMSchedule(), loss_weight=5.0)
    batch = mixed_batch(97, TINY_IMAGE)
    for step in range(3):
        loss = objective(model, batch["input_ids"], batch["modality"], latents=batch["images"],
                         generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.loss.backward()
        opt.step()

    text_params = dict(model.grouped_parameters()["text"])
    for name, before in text_before.items():
        param = text_params[name]
        assert not param.requires_grad and param.grad is None, name
        assert param not in opt.state, f"{name} has optimizer state"
        assert torch.equal(param, before), f"text parameter {name} changed"
    changed = [n for n, p in model.grouped_parameters()["image"] if not torch.equal(p, image_before[n])]
    assert changed, "the image set did not train at all"

    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
