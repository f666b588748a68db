"""The image path: initialisation from the text set, and where each loss's gradient goes."""

import torch

from megafusion.config.schema import OptimConfig
from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.model import LlamaFusion
from megafusion.model.routing import Routed
from megafusion.training.objective import TransfusionObjective
from megafusion.training.optim import build_optimizer
from tests.helpers import TINY_IMAGE, TINY_UNET, mixed_batch, save_tiny_llama

SPECIAL = ("special_embed", "special_head")


def _deep(path):
    save_tiny_llama(path, "gqa-untied")
    return LlamaFusion.from_llama(path, separation="deep", image=TINY_IMAGE, unet=TINY_UNET)


def _nonzero(p):
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


def test_deep_image_set_starts_as_copy_of_text_set(tmp_path):
    model = _deep(tmp_path)
    routed = [m for m in model.modules() if isinstance(m, Routed)]
    assert len(routed) == 3 * model.arch.num_layers
    for module in routed:
        text, image = module.text.state_dict(), module.image.state_dict()
        assert text.keys() == image.keys()
        for key in text:
            assert torch.equal(text[key], image[key])
            assert text[key].data_ptr() != image[key].data_ptr(), "image set must be a copy, not shared storage"


def test_deep_layer_has_text_and_image_sets_of_every_part(tmp_path):
    names = {n for n, _ in _deep(tmp_path).named_parameters() if n.startswith("layers.0.")}
    for part in ("attn_in.{}.norm.weight", "attn_in.{}.q_proj.weight", "attn_in.{}.k_proj.weight",
                 "attn_in.{}.v_proj.weight", "attn_out.{}.weight", "ffn.{}.norm.weight", "ffn.{}.gate_proj.weight",
                 "ffn.{}.up_proj.weight", "ffn.{}.down_proj.weight"):
        for s in ("text", "image"):
            assert "layers.0." + part.format(s) in names


def test_diffusion_gradient_reaches_every_image_parameter_and_no_text_parameter(tmp_path):
    """An image-only sequence with everything trainable: the routing alone decides which weights see it."""
    model = _deep(tmp_path)
    n = TINY_IMAGE.tokens_per_image
    ids = torch.zeros(1, 2 * n, dtype=torch.long)
    modality = torch.ones(1, 2 * n, dtype=torch.long)
    objective = TransfusionObjective(DDPMSchedule(), loss_weight=1.0)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    out = objective(model, ids, modality, latents=latents, generator=torch.Generator().manual_seed(0))
    assert out.num_text_targets == 0
    out.loss.backward()
    for name, p in model.grouped_parameters()["image"]:
        if name not in SPECIAL:
            assert _nonzero(p), f"image parameter {name} got no diffusion gradient"
    for name, p in model.grouped_parameters()["text"]:
        assert not _nonzero(p), f"text parameter {name} got a gradient from an image-only sequence"


def test_frozen_text_gets_no_gradient_on_mixed_batch(tmp_path):
    model = _deep(tmp_path)
    build_optimizer(model, OptimConfig(lr_text=0.0, warmup_steps=0, total_steps=10))
    batch = mixed_batch(97, TINY_IMAGE)
    out = TransfusionObjective(DDPMSchedule(), 5.0)(
        model, batch["input_ids"], batch["modality"], latents=batch["images"], generator=torch.Generator()
    )
    out.loss.backward()
    assert all(p.grad is None for _, p in model.grouped_parameters()["text"])
    assert all(_nonzero(p) for _, p in model.grouped_parameters()["image"])


def test_caption_lm_loss_reaches_image_parameters_through_attention(tmp_path):
    model = _deep(tmp_path)
    build_optimizer(model, OptimConfig(lr_text=0.0, warmup_steps=0, total_steps=10))
    batch = mixed_batch(97, TINY_IMAGE)
    # Row 1 is image-first: BOI, image, EOI, caption. Only its caption's LM loss is used here.
    objective = TransfusionObjective(DDPMSchedule(), loss_weight=0.0)
    out = objective(model, batch["input_ids"][1:], batch["modality"][1:], latents=batch["images"][1:],
                    image_first=torch.tensor([True]), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    params = dict(model.named_parameters())
    for name in ("unet_down.conv_in.weight", "layers.0.attn_in.image.k_proj.weight",
                 "layers.0.attn_in.image.v_proj.weight", "layers.0.ffn.image.down_proj.weight"):
        assert _nonzero(params[name]), f"{name} got no gradient from the caption's LM loss"
    # The U-Net up and the last layer's image output path cannot influence any text token.
    assert not any(_nonzero(p) for n, p in params.items() if n.startswith("unet_up."))
    last = model.arch.num_layers - 1
    assert not _nonzero(params[f"layers.{last}.ffn.image.down_proj.weight"])


def test_boi_eoi_are_new_rows_and_base_rows_stay(tmp_path):
    model = _deep(tmp_path)
    assert (model.boi_id, model.eoi_id) == (97, 98)
    ids = torch.tensor([[3, model.boi_id, 5, model.eoi_id]])
    emb = model.embed(ids)
    torch.testing.assert_close(emb[0, 1], model.special_embed[0])
    torch.testing.assert_close(emb[0, 3], model.special_embed[1])
    torch.testing.assert_close(emb[0, 0], model.embed_tokens.weight[3])
    assert model.parameter_group("special_embed") == model.parameter_group("special_head") == "image"
    out = model(input_ids=ids)
    assert out.logits.shape[-1] == 97 and out.special_logits.shape[-1] == 2


def test_without_the_unet_skip_every_image_passes_through_its_tokens(tmp_path):
    """unet.skip: false: the U-Net up reads only the image tokens, so the noise prediction depends on the text
    before the image (through attention) and not on the skip; the config round-trips through save/load."""
    from dataclasses import replace

    save_tiny_llama(tmp_path / "base", "gqa-untied")
    model = LlamaFusion.from_llama(tmp_path / "base", separation="deep", image=TINY_IMAGE,
                                   unet=replace(TINY_UNET, skip=False)).eval()
    assert model.unet_up.blocks[0].conv1.in_channels == TINY_UNET.channels
    tokens = torch.randn(2, TINY_IMAGE.tokens_per_image, model.arch.hidden_size)
    t = torch.tensor([10, 500])
    skip = torch.randn(2, TINY_UNET.channels, TINY_IMAGE.latent_size, TINY_IMAGE.latent_size)
    torch.testing.assert_close(model.unet_up(tokens, t, skip), model.unet_up(tokens, t, None), rtol=0, atol=0)

    n = TINY_IMAGE.tokens_per_image
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    preds = []
    for caption in ([5, 6, 7], [9, 9, 2]):
        ids = torch.tensor([caption + [model.boi_id] + [0] * n + [model.eoi_id]])
        modality = torch.tensor([[0] * 4 + [1] * n + [0]])
        with torch.no_grad():
            preds.append(model(ids, modality, images=latents, timesteps=torch.tensor([500])).noise_pred)
    assert not torch.allclose(preds[0], preds[1]), "the caption must reach the noise prediction"
    model.save_pretrained(tmp_path / "saved")
    assert LlamaFusion.from_pretrained(tmp_path / "saved").unet_config.skip is False


def test_token_init_scale_scales_the_initial_image_tokens(tmp_path):
    """unet.token_init_scale multiplies the token projection's initial weight and bias: the image tokens of a
    latent are that multiple of the default-initialised ones (same seed), the rest of the U-Net is unchanged,
    and the setting round-trips through save/load."""
    from dataclasses import replace

    from megafusion.model.unet import UNetDown

    hidden = 24
    latents = torch.randn(3, TINY_IMAGE.latent_channels, TINY_IMAGE.latent_size, TINY_IMAGE.latent_size)
    t = torch.tensor([0, 300, 999])
    torch.manual_seed(0)
    default = UNetDown(TINY_IMAGE, TINY_UNET, hidden)
    torch.manual_seed(0)
    scaled = UNetDown(TINY_IMAGE, replace(TINY_UNET, token_init_scale=0.3), hidden)
    with torch.no_grad():
        tokens, skip = default(latents, t)
        tokens_scaled, skip_scaled = scaled(latents, t)
    torch.testing.assert_close(tokens_scaled, 0.3 * tokens)
    torch.testing.assert_close(skip_scaled, skip, rtol=0, atol=0)
    assert tokens_scaled.norm() < 0.5 * tokens.norm()  # the scale took effect, not a no-op on both

    save_tiny_llama(tmp_path / "base", "gqa-untied")
    model = LlamaFusion.from_llama(tmp_path / "base", separation="deep", image=TINY_IMAGE,
                                   unet=replace(TINY_UNET, token_init_scale=0.3))
    model.save_pretrained(tmp_path / "saved")
    assert LlamaFusion.from_pretrained(tmp_path / "saved").unet_config.token_init_scale == 0.3
