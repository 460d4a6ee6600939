"""wsss.pipeline and wsss.evaluate.priors: the pieces of the WSSS protocol, checked against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from wsss.data.synth import make_synthetic
from wsss.data.voc import VOCDataset
from wsss.errors import ConfigError
from wsss.evaluate.priors import centre_gaussian, class_mean_masks, mean_mask_prior, prior_miou
from wsss.pipeline import PipelineSettings, SegmentTest, calibrated_params, first_images, pseudo_score


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("pipe") / "d", num_train=6, num_val=4, size=32, seed=3)


def test_calibrated_params_move_each_rule_to_the_maps_threshold():
    assert calibrated_params("threshold", {"bg_threshold": 0.4}, 0.25) == {"bg_threshold": 0.25}
    psa = calibrated_params("psa", {"alpha": 12.0}, 0.47)["alpha"]
    assert psa == pytest.approx(math.log(0.47) / math.log(0.53))
    assert (1 - 0.47) ** psa == pytest.approx(0.47)  # the background equals the map at the threshold
    two = calibrated_params("two_thresholds", {"high": 0.55, "low": 0.35}, 0.25)
    assert two == pytest.approx({"high": 0.35, "low": 0.15})
    assert calibrated_params("two_thresholds", {"high": 0.55, "low": 0.35}, 0.95) == pytest.approx(
        {"high": 1.0, "low": 0.85})
    # GETAM's completion percentile and a dataset without background keep the recipe's values.
    assert calibrated_params("completion", {"cut_threshold": 0.9}, 0.3) == {"cut_threshold": 0.9}
    assert calibrated_params("psa", {"alpha": 12.0}, None) == {"alpha": 12.0}


def test_pseudo_score_weighs_coverage():
    assert pseudo_score({"pseudo_train": {"miou": 0.8, "coverage": 0.5}}) == pytest.approx(0.4)
    assert pseudo_score({"pseudo_train": {"miou": 0.5, "coverage": 1.0}}) > 0.4
    assert pseudo_score({}) == 0.0


def test_first_images_leaves_the_dataset_whole(tiny):
    full = VOCDataset(tiny, "val")
    ids = list(full.ids)
    part = first_images(full, 2)
    assert part.ids == ids[:2] and full.ids == ids and len(part) == 2
    assert first_images(full, None) is full and first_images(full, 10) is full
    np.testing.assert_array_equal(part.load_mask(1), full.load_mask(1))


def test_settings_refuse_bad_values(tiny, tmp_path):
    with pytest.raises(ConfigError, match="segment"):
        PipelineSettings(data=tiny, run_root=tmp_path, segment="some")
    with pytest.raises(ConfigError, match="limit"):
        PipelineSettings(data=tiny, run_root=tmp_path, limit=0)
    assert PipelineSettings(data=tiny, run_root=tmp_path).recipe_name == "d"


def test_segment_test_names_its_protocol_and_refuses_bad_values():
    assert SegmentTest().tag == "s1"
    assert SegmentTest(scales=(0.5, 1.0, 1.25), flip=True, crf="aream").tag == "s0.5-1-1.25_flip_crf-aream"
    assert SegmentTest(scales=(1, 2)).scales == (1.0, 2.0)
    for bad in [(1.0, 0.0), (), (float("nan"),)]:
        with pytest.raises(ConfigError, match="scale"):
            SegmentTest(scales=bad)
    with pytest.raises(ConfigError, match="unknown CRF preset"):
        SegmentTest(crf="deeplab")
    assert SegmentTest(scales=(0.5, 1.0), fusion="max", crf="aream").tag == "s0.5-1_max_crf-aream"
    with pytest.raises(ConfigError, match="fusion"):
        SegmentTest(fusion="sum")


def test_centre_gaussian_values():
    g = centre_gaussian(1, (5, 9))
    assert g[2, 4] == pytest.approx(1.0)  # the centre pixel
    # One row up from the centre of a 5-row map: (1 / (5 / 4))^2 / 2 = 0.32.
    assert g[1, 4] == pytest.approx(math.exp(-0.32))
    assert g[2, 0] == pytest.approx(math.exp(-0.5 * (4 / (9 / 4)) ** 2))


def test_mean_mask_prior_of_a_dataset_on_itself_is_its_mean(tiny):
    train = VOCDataset(tiny, "train")
    means = class_mean_masks(train, side=32)
    # By hand for one class: the mean over the images containing it of (mask == class).
    c = int(np.flatnonzero(train.labels(0) > 0)[0]) + 1
    with_c = [train.load_mask(i) == c for i in range(len(train)) if np.any(train.load_mask(i) == c)]
    np.testing.assert_allclose(means[c], np.mean(with_c, axis=0))
    # A prior that is the true mask scores 1; the mean mask scores below that but above 0.
    assert 0.0 < mean_mask_prior(train, train, side=32) < 1.0


def test_prior_miou_of_the_truth_is_one(tiny):
    val = first_images(VOCDataset(tiny, "val"), 1)
    mask = val.load_mask(0)
    assert prior_miou(val, lambda c, size: (mask == c).astype(np.float32)) == pytest.approx(1.0)
    # The centre prior on the same image is a real, lower score.
    assert 0.0 < prior_miou(val, centre_gaussian) < 1.0


def test_stages_refuse_to_resume_with_other_settings(tmp_path):
    from wsss.pipeline import Stages

    path = tmp_path / "stages.json"
    first = Stages(path, resume=False, settings={"recipe": "demo"})
    assert first.run("a", lambda: 1) == 1
    assert Stages(path, resume=True, settings={"recipe": "demo"}).run("a", lambda: 2) == 1  # read back
    assert Stages(path, resume=False, settings={"recipe": "demo"}).run("a", lambda: 3) == 3  # fresh
    with pytest.raises(ConfigError, match="recipe: 'demo' -> 'msrc'"):
        Stages(path, resume=True, settings={"recipe": "msrc"})


def test_demo_findings_say_which_method_loses_and_what_moved():
    from wsss.cli.demo import findings

    pseudo = {"miou": 0.3, "coverage": 1.0, "refine": "par", "rule": "threshold"}
    results = {
        "methods": {"baseline": {"pseudo_train": pseudo},
                    "aream": {"pseudo_train": {**pseudo, "miou": 0.2}},
                    "acr": {"pseudo_train": {**pseudo, "miou": 0.4}}},
        "maps": {"baseline": {"cam": 0.18, "aream": 0.24, "acr": 0.17},
                 "aream": {"cam": 0.21, "aream": 0.18}, "acr": {"cam": 0.10, "acr": 0.20}},
    }
    notes = findings(results)
    assert len(notes) == 2  # acr beats the baseline with its map and its pseudo labels: no sentence
    assert "`aream` gives 18.0 on the aream model against 24.0" in notes[0]
    assert "CAM rose (18.0 -> 21.0)" in notes[0]
    assert "aream**'s pseudo labels" in notes[1] and "20.0 against the baseline's 30.0" in notes[1]
    results["maps"]["acr"]["acr"] = 0.1
    assert "got worse too (CAM 18.0 -> 10.0)" in findings(results)[-1]
