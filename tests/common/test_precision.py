"""`precision: auto` follows the measured probe; an explicit precision is respected whatever the probe says."""

import pytest
import torch

from megafusion.common.precision import BF16_MARGIN, choose_precision, cpu_info, probe_matmul


def _probe(fp32: float, bf16: float):
    calls = []

    def probe(shapes, repeats):
        calls.append(list(shapes))
        return fp32, bf16

    return probe, calls


def test_auto_picks_bf16_only_when_the_probe_says_it_is_clearly_faster():
    fast, _ = _probe(fp32=100.0, bf16=300.0)  # an AMX-like CPU
    slow, _ = _probe(fp32=70.0, bf16=1.5)  # AVX2 only: bf16 emulated
    close, _ = _probe(fp32=100.0, bf16=100.0 * BF16_MARGIN * 0.99)
    assert choose_precision("auto", "cpu", probe=fast).precision == "bf16"
    assert choose_precision("auto", "cpu", probe=slow).precision == "fp32"
    assert choose_precision("auto", "cpu", probe=close).precision == "fp32"
    choice = choose_precision("auto", "cpu", probe=slow)
    assert (choice.fp32_gflops, choice.bf16_gflops) == (70.0, 1.5) and choice.dtype == torch.float32
    assert "70.0" in choice.reason and "1.5" in choice.reason


@pytest.mark.parametrize("explicit", ["fp32", "bf16"])
def test_explicit_precision_is_respected_and_nothing_is_measured(explicit):
    for fp32, bf16 in ((100.0, 300.0), (70.0, 1.5)):
        probe, calls = _probe(fp32, bf16)
        choice = choose_precision(explicit, "cpu", probe=probe)
        assert choice.precision == explicit and choice.reason == "explicit" and not calls


def test_the_probe_runs_at_the_shapes_it_is_given():
    probe, calls = _probe(1.0, 1.0)
    choose_precision("auto", "cpu", shapes=[(8, 16, 32)], probe=probe)
    assert calls == [[(8, 16, 32)]]


def test_a_bad_precision_names_the_key():
    with pytest.raises(ValueError, match="precision: must be one of"):
        choose_precision("fp16", "cpu")


def test_the_real_probe_measures_both_dtypes_and_the_cpu_is_described():
    fp32, bf16 = probe_matmul([(16, 32, 32)], repeats=1)
    assert fp32 > 0 and bf16 > 0
    info = cpu_info()
    assert info["model"] and isinstance(info["flags"], list) and info["torch_threads"] >= 1
