"""DeepSpeed config generation and per-layer activation checkpointing."""

import json

import pytest
import torch

from megafusion.config.schema import TrainConfig
from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.model import LlamaFusion
from megafusion.training.deepspeed_setup import apply_layer_checkpointing, deepspeed_config
from megafusion.training.objective import TransfusionObjective
from tests.helpers import TINY_IMAGE, TINY_UNET, mixed_batch, save_tiny_llama


def test_generated_deepspeed_config_and_user_json(tmp_path):
    cfg = deepspeed_config(TrainConfig(micro_batch_size=3, grad_accum_steps=2, zero_stage=1, precision="fp32"))
    assert cfg["train_micro_batch_size_per_gpu"] == 3 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["zero_optimization"]["stage"] == 1 and not cfg["bf16"]["enabled"]
    merged = deepspeed_config(TrainConfig(zero_stage=3, deepspeed_config="configs/deepspeed/zero3.json"))
    assert merged["zero_optimization"]["stage3_max_live_parameters"] == 1_000_000_000
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    with pytest.raises(ValueError, match="'gradient_accumulation_steps' = 8 disagrees"):
        deepspeed_config(TrainConfig(deepspeed_config=str(bad)))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shipped_zero_configs_name_their_stage(stage):
    cfg = json.loads(open(f"configs/deepspeed/zero{stage}.json").read())
    assert cfg["zero_optimization"]["stage"] == stage


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tmp_path):
    save_tiny_llama(tmp_path, "gqa-untied")
    batch = mixed_batch(97, TINY_IMAGE)
    results = []
    for checkpointed in (False, True):
        torch.manual_seed(0)  # same U-Net initialisation for both
        model = LlamaFusion.from_llama(tmp_path, image=TINY_IMAGE, unet=TINY_UNET)
        if checkpointed:
            apply_layer_checkpointing(model)
            assert "_checkpoint_wrapped_module" in "".join(n for n, _ in model.named_modules())
        out = TransfusionObjective(DDPMSchedule(), 5.0)(model, batch["input_ids"], batch["modality"],
                                                        latents=batch["images"], generator=torch.Generator())
        out.loss.backward()
        grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}
        results.append((out.loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)
