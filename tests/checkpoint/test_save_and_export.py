"""save_pretrained/from_pretrained round trip, and the text export read back by transformers."""

import pytest
import torch
from transformers import LlamaForCausalLM

from megafusion.checkpoint.text_export import export_text_model
from megafusion.cli import main
from megafusion.config.schema import OptimConfig
from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.model import LlamaFusion
from megafusion.training.objective import TransfusionObjective
from megafusion.training.optim import build_optimizer
from tests.helpers import TINY_IMAGE, TINY_UNET, mixed_batch, save_tiny_llama


def _trained(tmp_path, variant, separation, lr_text):
    """A model whose text and image sets both moved away from the base (so the checks are not vacuous)."""
    save_tiny_llama(tmp_path / "base", variant)
    model = LlamaFusion.from_llama(tmp_path / "base", separation=separation, image=TINY_IMAGE, unet=TINY_UNET)
    opt = build_optimizer(model, OptimConfig(lr_text=lr_text, lr_image=1e-2, warmup_steps=0, total_steps=5))
    batch = mixed_batch(97, TINY_IMAGE)
    for _ in range(2):
        out = TransfusionObjective(DDPMSchedule(), 5.0)(model, batch["input_ids"], batch["modality"],
                                                        latents=batch["images"], generator=torch.Generator())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval(), batch


@pytest.mark.parametrize("variant", ["gqa-untied", "mha-tied"])
def test_save_and_load_round_trip(tmp_path, variant):
    model, batch = _trained(tmp_path, variant, "deep", lr_text=0.0)
    model.save_pretrained(tmp_path / "fused")
    loaded = LlamaFusion.from_pretrained(tmp_path / "fused").eval()
    t = torch.tensor([3, 600])
    with torch.no_grad():
        a, b = model(**{**batch, "timesteps": t}), loaded(**{**batch, "timesteps": t})
    assert torch.equal(a.logits, b.logits) and torch.equal(a.noise_pred, b.noise_pred)
    assert loaded.separation == "deep" and loaded.base_path == model.base_path


@pytest.mark.parametrize("variant", ["gqa-untied", "mha-tied"])
def test_text_export_loads_in_transformers_with_identical_logits(tmp_path, variant):
    # lr_text > 0 with no separation: the exported text weights differ from the base.
    model, _ = _trained(tmp_path, variant, "none", lr_text=1e-2)
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    model.save_pretrained(tmp_path / "fused")
    assert main(["export-text", "--model", str(tmp_path / "fused"), "--out", str(tmp_path / "text")]) == 0
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "text").eval()
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        torch.testing.assert_close(exported(ids).logits, ours, atol=1e-5, rtol=0)
        assert (base(ids).logits - ours).abs().max() > 1e-3


def test_text_export_of_frozen_model_is_the_base(tmp_path):
    model, _ = _trained(tmp_path, "gqa-untied", "deep", lr_text=0.0)
    export_text_model(model, tmp_path / "text")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    exported = LlamaForCausalLM.from_pretrained(tmp_path / "text").state_dict()
    assert base.keys() == exported.keys()
    assert all(torch.equal(base[k], exported[k]) for k in base)


def test_from_pretrained_on_wrong_directory(tmp_path):
    save_tiny_llama(tmp_path, "gqa-untied")
    with pytest.raises(FileNotFoundError, match="fusion_config.json.*from_llama"):
        LlamaFusion.from_pretrained(tmp_path)


def test_saved_model_carries_diffusion_settings_and_document_prefix(tmp_path):
    from megafusion.model.args import DiffusionArgs

    save_tiny_llama(tmp_path / "base")
    model = LlamaFusion.from_llama(tmp_path / "base", image=TINY_IMAGE, unet=TINY_UNET)
    model.diffusion_args = DiffusionArgs(num_train_timesteps=500, beta_schedule="linear")
    model.document_prefix = [1]
    loaded = LlamaFusion.from_pretrained(model.save_pretrained(tmp_path / "fused"))
    assert loaded.diffusion_args == DiffusionArgs(500, "linear", "epsilon")
    assert loaded.document_prefix == [1]


def test_model_saved_before_diffusion_settings_loads_with_the_defaults_it_was_trained_with(tmp_path):
    import json

    from megafusion.model.args import DiffusionArgs

    save_tiny_llama(tmp_path / "base")
    out = LlamaFusion.from_llama(tmp_path / "base", image=TINY_IMAGE, unet=TINY_UNET).save_pretrained(tmp_path / "f")
    meta = json.loads((out / "fusion_config.json").read_text())
    for key in ("diffusion", "document_prefix"):
        meta.pop(key)
    meta["format_version"] = 1
    (out / "fusion_config.json").write_text(json.dumps(meta))
    loaded = LlamaFusion.from_pretrained(out)
    assert loaded.diffusion_args == DiffusionArgs(1000, "squaredcos_cap_v2") and loaded.document_prefix is None


def test_a_bad_diffusion_entry_names_the_file(tmp_path):
    import json

    save_tiny_llama(tmp_path / "base")
    out = LlamaFusion.from_llama(tmp_path / "base", image=TINY_IMAGE, unet=TINY_UNET).save_pretrained(tmp_path / "f")
    meta = json.loads((out / "fusion_config.json").read_text())
    meta["diffusion"]["beta_schedule"] = "quadratic"
    (out / "fusion_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fusion_config.json.*beta_schedule"):
        LlamaFusion.from_pretrained(out)
