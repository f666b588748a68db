"""The weight average (train.ema_decay): its schedule, its arithmetic against a plain float64 recurrence, what it
tracks, and the config checks. Resume and export with it are in test_trainer.py and test_torch_engine.py."""

import pytest
import torch
from torch import nn

from megafusion.config import load_config
from megafusion.config.loader import ConfigError
from megafusion.training.ema import WeightEMA, ema_decay_at


def test_decay_schedule_hand_values():
    assert ema_decay_at(0.99, 1) == 0.0  # the first step copies the weights
    assert ema_decay_at(0.99, 2) == pytest.approx(2 / 11)
    assert ema_decay_at(0.99, 11) == pytest.approx(11 / 20)
    assert ema_decay_at(0.99, 10_000) == 0.99  # capped


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    net[0].bias.requires_grad_(False)  # frozen: not averaged
    return net


def test_average_follows_the_recurrence_and_skips_frozen_parameters():
    net = _net()
    ema = WeightEMA(net.named_parameters(), decay=0.9)
    assert ema.names == ["0.weight", "1.weight", "1.bias"]
    reference = {n: p.detach().double().clone() for n, p in net.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(1)
    for step in range(1, 31):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=generator))
        ema.update(step)
        d = 0.0 if step == 1 else min(0.9, step / (step + 9))
        for n, p in net.named_parameters():
            if n in reference:
                reference[n] = d * reference[n] + (1 - d) * p.detach().double()
    for name, value in ema.state_dict().items():
        torch.testing.assert_close(value.double(), reference[name], rtol=1e-6, atol=1e-6, msg=name)
        assert not torch.equal(value, dict(net.named_parameters())[name].detach()), "the average is the weights"


def test_bf16_weights_are_averaged_in_fp32():
    net = _net().to(torch.bfloat16)
    ema = WeightEMA(net.named_parameters(), decay=0.99)
    before = {n: v.clone() for n, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(2.0 ** -4)
    for step in range(1, 50):
        ema.update(step)
    for name, value in ema.state_dict().items():
        assert value.dtype == torch.float32
        assert not torch.equal(value, before[name]), name


def test_state_round_trip_and_a_mismatch_names_its_source():
    net = _net()
    ema = WeightEMA(net.named_parameters(), decay=0.9)
    with torch.no_grad():
        net[1].weight.add_(1.0)
    ema.update(1)
    saved = {n: v.clone() for n, v in ema.state_dict().items()}
    fresh = WeightEMA(_net().named_parameters(), decay=0.9)
    fresh.load_state_dict(saved)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, saved[name])
    with pytest.raises(ValueError, match=r"run/ema.safetensors: .*missing \['1.bias'\]"):
        fresh.load_state_dict({k: v for k, v in saved.items() if k != "1.bias"}, source="run/ema.safetensors")
    fresh.restart()
    assert torch.equal(fresh.state_dict()["1.weight"], fresh.params[1].detach())


@pytest.mark.parametrize("override, message", [
    ("--train.ema_decay=1.0", "train.ema_decay': must be in"),
    ("--train.ema_decay=-0.1", "train.ema_decay': must be in"),
])
def test_bad_decay_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny-cpu.yaml", [override])


def test_zero3_with_an_average_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="train.ema_decay': not supported with zero_stage 3"):
        load_config("configs/tiny-cpu.yaml", ["--train.ema_decay=0.99", "--train.zero_stage=3"])
    load_config("configs/tiny-cpu.yaml", ["--train.ema_decay=0.99", "--train.zero_stage=3", "--train.engine=torch"])


def test_a_checkpoint_without_an_average_restarts_it_from_the_resumed_weights(tmp_path, caplog):
    from megafusion.training.run_checkpoints import CheckpointManager

    model = nn.Linear(3, 2)
    ema = WeightEMA(model.named_parameters(), 0.9)
    with torch.no_grad():
        model.weight.add_(1.0)  # the resumed weights differ from where the average stood
    manager = CheckpointManager(tmp_path, 1, {}, 0, 1)
    manager.track_ema(ema)
    (tmp_path / "step-00000004").mkdir()  # saved by a run without train.ema_decay: no ema.safetensors
    with caplog.at_level("WARNING"):
        manager.restore_ema("step-00000004")
    assert torch.equal(ema.state_dict()["weight"], model.weight.detach())
    assert "step-00000004: holds no weight average" in caplog.text
