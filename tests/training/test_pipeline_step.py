"""The pipeline's per-micro-batch preparation draws what the objective draws and hands the last stage its target."""

import torch

from megafusion.config.schema import DiffusionConfig
from megafusion.diffusion.schedule import DDPMSchedule
from megafusion.training.objective import TransfusionObjective
from megafusion.training.pipeline_step import prepare_micro_batch
from tests.helpers import TINY_IMAGE, mixed_batch


def test_v_prediction_stage_target_is_diffusers_velocity():
    """Under pp the last stage compares the U-Net up with the `noise` entry: for v prediction it must hold v
    (diffusers' get_velocity of the same draws), padded with zero rows to max_images."""
    from diffusers import DDPMScheduler

    mixed = mixed_batch(97, TINY_IMAGE)
    batch = {"input_ids": mixed["input_ids"], "modality": mixed["modality"], "latents": mixed["images"],
             "doc_ids": torch.zeros_like(mixed["input_ids"]), "labels": mixed["input_ids"].clone(),
             "image_first": torch.tensor([False, True])}
    schedule = DDPMSchedule(DiffusionConfig(prediction_type="v_prediction"))
    out = prepare_micro_batch(batch, torch.Generator().manual_seed(3), TransfusionObjective(schedule, 5.0),
                              max_images=3)
    g = torch.Generator().manual_seed(3)
    t = schedule.sample_timesteps(batch["image_first"], g)
    noise = torch.randn(mixed["images"].shape, generator=g)
    velocity = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                             prediction_type="v_prediction").get_velocity(mixed["images"], noise, t)
    torch.testing.assert_close(out["noise"][:2], velocity, atol=1e-5, rtol=1e-5)
    assert out["noise"].shape[0] == 3 and not out["noise"][2].any()
    torch.testing.assert_close(out["noisy"][:2], schedule.add_noise(mixed["images"], noise, t))
