"""The trainer resolves `train.precision: auto` by the measured probe (injected here both ways) and respects an
explicit precision; the engine config follows the resolved choice."""

import pytest

import megafusion.common.precision as precision_module
from megafusion.config.schema import TrainConfig
from megafusion.model import LlamaFusion
from megafusion.training.deepspeed_setup import deepspeed_config
from megafusion.training.run_setup import resolve_precision
from tests.helpers import TINY_IMAGE, TINY_UNET, save_tiny_llama


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    save_tiny_llama(path)
    return LlamaFusion.from_llama(path, image=TINY_IMAGE, unet=TINY_UNET)


@pytest.mark.parametrize("rates,expected", [((100.0, 300.0), "bf16"), ((70.0, 1.5), "fp32")])
def test_auto_follows_the_probe(monkeypatch, model, rates, expected):
    seen = []

    def probe(shapes, repeats):
        seen.append(list(shapes))
        return rates

    monkeypatch.setattr(precision_module, "probe_matmul", probe)
    choice = resolve_precision("auto", model, rank=0)
    assert choice.precision == expected and (choice.fp32_gflops, choice.bf16_gflops) == rates
    # The probe ran at the model's own projection widths.
    assert all(k in (32, 64) and n in (32, 64) for _, k, n in seen[0])
    assert deepspeed_config(TrainConfig(precision="auto"), choice.precision)["bf16"]["enabled"] == (expected == "bf16")


@pytest.mark.parametrize("explicit", ["fp32", "bf16"])
def test_explicit_precision_wins(monkeypatch, model, explicit):
    def probe(shapes, repeats):
        raise AssertionError("an explicit precision must not be measured")

    monkeypatch.setattr(precision_module, "probe_matmul", probe)
    assert resolve_precision(explicit, model, rank=0).precision == explicit
    assert deepspeed_config(TrainConfig(precision=explicit))["bf16"]["enabled"] == (explicit == "bf16")
