"""The demo report's targets and generation tables, from a hand-made evaluation result."""

import pytest

from megafusion.demo.report import _generation_tables, _provenance, _targets


def _point(scale, mlp, svm, fid=90.0):
    return {"guidance_scale": scale, "accuracy": min(mlp, svm), "accuracy_by_judge": {"mlp": mlp, "hog_svm": svm},
            "classifier_label_accuracy": mlp, "fid_in_domain": fid, "confusion": {}}


@pytest.fixture
def results():
    sweep = [_point(1.0, 0.3, 0.2), _point(1.55, 0.6, 0.55, fid=60.0), _point(3.0, 0.85, 0.7),
             _point(5.0, 0.9, 0.82, fid=120.0)]
    gen = {**sweep[-1], "guidance_scale": 5.0, "guidance_sweep": sweep,
           "judges": {"mlp": "an MLP", "hog_svm": "an SVM"}, "confidence_threshold": 0.7,
           "prompt_phrasing": "a handwritten digit {d}", "seed": 0,
           "out_of_template": {**_point(5.0, 0.5, 0.4), "prompt_phrasing": "a handwritten figure showing {word}"}}
    return {"split": "test", "generation": gen, "captioning": {"accuracy": 0.96}, "text": {"identical": True},
            "classifier": {"fid_real_floor": 50.0, "fid_real_train_vs_test": 50.0, "test_images": 360,
                           "heldout_images": 360},
            "judges": {"mlp": {"val_confident_accuracy": 0.95, "test_confident_accuracy": 0.967, "test_accuracy": 0.97},
                       "hog_svm": {"val_confident_accuracy": 0.985, "test_confident_accuracy": 0.98}},
            "settings": {"chosen": {"guidance scale 5": "val generation accuracy"}}}


def test_targets_use_the_weaker_judge_and_the_fid_floor(results):
    t = _targets(results, wall=1000.0, dataset="digits")
    assert t["generation_accuracy_cfg_le_5"]["value"] == 0.82 and t["generation_accuracy_cfg_le_5"]["met"]
    assert t["generation_accuracy_cfg_1.55"]["value"] == 0.55 and t["generation_accuracy_cfg_1.55"]["met"]
    # FID at the headline scale (5) and at 1.55, each over the same real-vs-real floor.
    assert t["fid_in_domain_over_floor"]["value"] == pytest.approx(2.4) and not t["fid_in_domain_over_floor"]["met"]
    assert t["fid_in_domain_over_floor_cfg_1.55"]["value"] == pytest.approx(1.2)
    assert t["fid_in_domain_over_floor_cfg_1.55"]["met"]
    assert t["caption_accuracy"]["met"] and t["wall_seconds"]["met"] and t["text_identical_to_base"]["met"]
    assert not _targets(results, wall=1300.0, dataset="digits")["wall_seconds"]["met"]
    assert _targets(results, wall=1.0, dataset="shapes")["generation_accuracy_cfg_le_5"]["met"] is None


def test_tables_name_split_choices_judges_and_out_of_template(results):
    md = "\n".join(_provenance(results) + _generation_tables(results, 50.0))
    assert "comes from the **test** split" in md and "| guidance scale 5 | val generation accuracy |" in md
    assert "| 1.55 | 0.600 | 0.550 | 0.600 | 60.00 | 50.00 |" in md
    assert "| hog_svm | an SVM | 0.985 | 0.980 | n/a | n/a |" in md
    assert "a handwritten figure showing {word}" in md and "mlp 0.500, hog_svm 0.400" in md
