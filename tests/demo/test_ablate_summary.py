"""The ablation's summary over seeds: mean and sample spread per arm, and the paper's ordering check."""

import math
import statistics

import pytest

from megafusion.demo.ablate import AblationSettings, ablation_markdown, paper_ordering, plot_ablation, seed_summary


def _row(separation, seed, gen, fid, cap, ratio=0.0):
    return {"arm": f"{separation}-{seed}", "separation": separation, "lr_ratio": ratio, "seed": seed,
            "generation_accuracy": gen, "generation_accuracy_cfg_1.55": gen - 0.05, "fid_in_domain": fid,
            "fid_in_domain_cfg_1": fid / 2, "caption_accuracy": cap, "cider": 0.5,
            "heldout_noise_mse": 0.2 - gen / 10, "caption_gain": gen / 100, "perplexity": 10.0,
            "perplexity_base": 10.0, "perplexity_change": 0.0, "greedy_identical": True, "text_identical": True}


ROWS = [_row("deep", 0, 0.8, 90, 0.9), _row("deep", 1, 0.6, 110, 0.7), _row("deep", 2, 0.7, 100, 0.8),
        _row("ffn", 0, 0.5, 120, 0.6), _row("ffn", 1, 0.4, 140, 0.5), _row("ffn", 2, 0.6, 130, 0.55),
        _row("none", 0, 0.2, 200, 0.3), _row("none", 1, 0.3, 180, 0.35), _row("none", 2, 0.1, 190, 0.25)]


def test_summary_is_mean_and_sample_std_over_seeds():
    summary = {e["separation"]: e for e in seed_summary(ROWS)}
    assert summary["deep"]["seeds"] == [0, 1, 2]
    assert summary["deep"]["generation_accuracy"]["mean"] == pytest.approx(0.7)
    assert summary["deep"]["generation_accuracy"]["std"] == pytest.approx(statistics.stdev([0.8, 0.6, 0.7]))
    assert summary["ffn"]["fid_in_domain"]["mean"] == pytest.approx(130.0)
    assert summary["none"]["fid_in_domain"]["std"] == pytest.approx(10.0)
    single = seed_summary([_row("deep", 0, 0.5, 100, 0.5)])[0]
    assert single["caption_accuracy"]["std"] == 0.0 and math.isclose(single["log_perplexity_ratio"], 0.0)
    assert summary["ffn"]["fid_in_domain_cfg_1"]["mean"] == pytest.approx(65.0)


def test_a_metric_no_run_scored_is_none_and_left_out_of_the_ordering():
    """The quick grid scores no CFG 1.55: the summary says so instead of failing, and the table shows n/a."""
    rows = [{k: v for k, v in r.items() if k != "generation_accuracy_cfg_1.55"} for r in ROWS]
    summary = seed_summary(rows)
    assert all(e["generation_accuracy_cfg_1.55"] is None for e in summary)
    assert "generation_accuracy_cfg_1.55" not in paper_ordering(summary)
    md = ablation_markdown(rows, AblationSettings(seeds=[0, 1, 2]))
    assert "| deep | 0 | 3 | 0.7 ± 0.1 | n/a |" in md


def test_paper_ordering_follows_the_means_and_the_better_direction():
    assert paper_ordering(seed_summary(ROWS)) == {
        "generation_accuracy": True, "generation_accuracy_cfg_1.55": True, "fid_in_domain": True,
        "fid_in_domain_cfg_1": True, "caption_accuracy": True, "heldout_noise_mse": True, "caption_gain": True}
    swapped = [dict(r, separation={"ffn": "none", "none": "ffn"}.get(r["separation"], r["separation"]))
               for r in ROWS]
    assert not any(paper_ordering(seed_summary(swapped)).values())
    assert paper_ordering(seed_summary(ROWS[:6])) == {}, "without the none arm there is no ordering to check"


def test_markdown_and_plot_show_every_seed_and_the_spread(tmp_path):
    md = ablation_markdown(ROWS, AblationSettings(seeds=[0, 1, 2]))
    assert "| deep | 0 | 3 | 0.7 ± 0.1 |" in md
    assert "| none | 0 | 2 |" in md and "generation_accuracy: holds" in md
    assert plot_ablation(seed_summary(ROWS), tmp_path / "a.png").stat().st_size > 0
