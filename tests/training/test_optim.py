"""Decoupled learning rates and the warmup + cosine-to-floor schedule."""

import math

import pytest
import torch

from megafusion.config.schema import OptimConfig
from megafusion.model import LlamaFusion
from megafusion.training.optim import build_lr_scheduler, build_optimizer, lr_factor
from tests.helpers import TINY_IMAGE, TINY_UNET, save_tiny_llama


def test_schedule_hand_values():
    cfg = OptimConfig(lr_image=1e-4, lr_min_image=1.5e-5, warmup_steps=4000, total_steps=250_000)
    assert lr_factor(0, cfg) == pytest.approx(1 / 4000)
    assert lr_factor(3999, cfg) == pytest.approx(1.0)
    assert lr_factor(4000, cfg) == pytest.approx(1.0)
    mid = 4000 + (250_000 - 4000) // 2
    assert lr_factor(mid, cfg) * 1e-4 == pytest.approx((1e-4 + 1.5e-5) / 2)
    assert lr_factor(250_000, cfg) * 1e-4 == pytest.approx(1.5e-5)
    assert lr_factor(10**7, cfg) * 1e-4 == pytest.approx(1.5e-5)
    q = 4000 + (250_000 - 4000) // 4
    assert lr_factor(q, cfg) * 1e-4 == pytest.approx(1.5e-5 + (1e-4 - 1.5e-5) * (1 + math.cos(math.pi / 4)) / 2)


def _model(tmp_path, separation="deep"):
    save_tiny_llama(tmp_path, "mha-tied")
    return LlamaFusion.from_llama(tmp_path, separation=separation, image=TINY_IMAGE, unet=TINY_UNET)


def test_decoupled_groups_and_their_rates(tmp_path):
    model = _model(tmp_path)
    cfg = OptimConfig(lr_text=1e-5, lr_image=1e-4, warmup_steps=10, total_steps=100)
    opt = build_optimizer(model, cfg)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"text", "text_no_decay", "image", "image_no_decay"}
    assert by_name["image_no_decay"]["weight_decay"] == 0.0 and by_name["image"]["weight_decay"] == 0.1
    sched = build_lr_scheduler(opt, cfg)
    assert by_name["text"]["lr"] == pytest.approx(1e-5 / 10) and by_name["image"]["lr"] == pytest.approx(1e-4 / 10)
    for _ in range(10):
        opt.step()
        sched.step()
    assert by_name["text"]["lr"] == pytest.approx(1e-5) and by_name["image"]["lr"] == pytest.approx(1e-4)
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in model.parameters()}, "every parameter is in exactly one group"


def test_zero_text_lr_freezes_text_parameters(tmp_path):
    model = _model(tmp_path)
    opt = build_optimizer(model, OptimConfig(lr_text=0.0, warmup_steps=0, total_steps=10))
    assert {g["name"] for g in opt.param_groups} == {"image", "image_no_decay"}
    assert all(not p.requires_grad for _, p in model.grouped_parameters()["text"])
    assert all(p.requires_grad for _, p in model.grouped_parameters()["image"])
    # The embedding table and the tied head are one frozen tensor; BOI/EOI rows live apart and train.
    assert not model.embed_tokens.weight.requires_grad and model.special_embed.requires_grad


@pytest.mark.parametrize("separation", ["none", "ffn"])
def test_shared_sets_belong_to_text_group(tmp_path, separation):
    model = _model(tmp_path, separation)
    text = {n for n, _ in model.grouped_parameters()["text"]}
    assert "layers.0.attn_in.shared.q_proj.weight" in text
    image = {n for n, _ in model.grouped_parameters()["image"]}
    assert ("layers.0.ffn.image.up_proj.weight" in image) == (separation == "ffn")
    opt = build_optimizer(model, OptimConfig(lr_text=0.0, warmup_steps=0, total_steps=10))
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == sum(p.numel() for n, p in model.grouped_parameters()["text"])
    assert opt.param_groups


def test_everything_frozen_is_an_error(tmp_path):
    model = _model(tmp_path)
    with pytest.raises(ValueError, match="nothing to train"):
        cfg = OptimConfig(lr_text=0.0, warmup_steps=0, total_steps=10)
        cfg.lr_image = 0.0
        build_optimizer(model, cfg)
    assert isinstance(model.embed_tokens.weight, torch.nn.Parameter)


def test_unet_lr_scale_gives_the_unets_their_own_rate(tmp_path):
    model = _model(tmp_path)
    opt = build_optimizer(model, OptimConfig(lr_image=1e-4, unet_lr_scale=4.0, warmup_steps=0, total_steps=10))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"image", "image_no_decay", "unet", "unet_no_decay"}
    assert by_name["unet"]["lr"] == pytest.approx(4e-4) and by_name["image"]["lr"] == pytest.approx(1e-4)
    unet_ids = {id(p) for m in (model.unet_down, model.unet_up) for p in m.parameters()}
    assert {id(p) for g in ("unet", "unet_no_decay") for p in by_name[g]["params"]} == unet_ids
    trainable = {id(p) for _, p in model.grouped_parameters()["image"]}
    assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
    with pytest.raises(ValueError, match="unet_lr_scale"):
        OptimConfig(unet_lr_scale=0.0)


def test_each_group_decays_to_its_own_floor(tmp_path):
    """lr_min_image is the image group's floor; the text group and the U-Nets keep the same ratio to their peaks."""
    model = _model(tmp_path)
    cfg = OptimConfig(lr_text=1e-5, lr_image=1e-4, lr_min_image=2e-5, unet_lr_scale=4.0, warmup_steps=2,
                      total_steps=10)
    opt = build_optimizer(model, cfg)
    sched = build_lr_scheduler(opt, cfg)
    for _ in range(12):  # past total_steps: the floor holds
        opt.step()
        sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["image"] == pytest.approx(2e-5) and lrs["image_no_decay"] == pytest.approx(2e-5)
    assert lrs["text"] == pytest.approx(1e-5 * 2e-5 / 1e-4) and lrs["text_no_decay"] == lrs["text"]
    assert lrs["unet"] == pytest.approx(4 * 2e-5) and lrs["unet_no_decay"] == lrs["unet"]


@pytest.mark.parametrize("implementation", ["fused", "foreach"])
def test_adamw_kernels_give_the_for_loop_update(tmp_path, implementation):
    """The fast kernels are a speed choice only: three steps equal torch's plain for-loop AdamW."""
    results = []
    for kernel in (implementation, "for_loop"):
        torch.manual_seed(0)
        model = _model(tmp_path)
        opt = build_optimizer(model, OptimConfig(lr_image=1e-2, warmup_steps=0, total_steps=10,
                                                 implementation=kernel))
        assert all(bool(g["fused"]) is (kernel == "fused") for g in opt.param_groups)
        trained = [p for p in model.parameters() if p.requires_grad]
        for step in range(3):
            for i, p in enumerate(trained):
                p.grad = torch.sin(torch.arange(p.numel(), dtype=torch.float32) + step + i).reshape(p.shape)
            opt.step()
        results.append([p.detach().clone() for p in trained])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
