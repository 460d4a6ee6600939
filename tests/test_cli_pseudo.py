"""``wsss pseudo`` end to end on a tiny synthetic VOC-layout dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.cli import pseudo as pseudo_cli
from wsss.data.io import load_maps, read_mask, save_maps, write_mask
from wsss.errors import ConfigError, DataError
from wsss.methods import REGISTRY
from wsss.pseudo import label_completion, maps_to_labels, psa_confident_labels, psa_labels, two_threshold_labels
from wsss.refine import make_refiner

H, W = 24, 32
IDS = ("a", "b", "c")


def _truth(image_id: str) -> np.ndarray:
    """Ground truth: a on the left half (cat), b cat left / dog right, c dog in the middle."""
    mask = np.zeros((H, W), np.uint8)
    if image_id == "a":
        mask[:, :16] = 1
    elif image_id == "b":
        mask[:, :16], mask[:, 16:] = 1, 2
    else:
        mask[6:18, 8:24] = 2
    return mask


def _maps(image_id: str) -> tuple[np.ndarray, list[int]]:
    truth = _truth(image_id)
    classes = sorted(int(c) for c in np.unique(truth) if c != 0)
    maps = np.stack([np.where(truth == c, 0.9, 0.1) for c in classes]).astype(np.float32)
    return maps, classes


@pytest.fixture
def dataset(tmp_path: Path) -> dict[str, Path]:
    root, maps_dir = tmp_path / "voc", tmp_path / "maps"
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(IDS) + "\n")
    rng = np.random.default_rng(0)
    for image_id in IDS:
        truth = _truth(image_id)
        image = (40 + 80 * truth[..., None] + rng.integers(0, 20, (H, W, 3))).astype(np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.png")
        write_mask(root / "SegmentationClass" / f"{image_id}.png", truth)
        save_maps(maps_dir / f"{image_id}.npz", *_maps(image_id))
    return {"root": root, "maps": maps_dir, "out": tmp_path / "out", "tmp": tmp_path}


def _parse(dataset: dict[str, Path], *extra: str, out: Path | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    pseudo_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(
        ["pseudo", "--maps", str(dataset["maps"]), "--data", str(dataset["root"]), "--split", "train",
         "--out", str(out or dataset["out"]), *extra]
    )


def _run(dataset: dict[str, Path], *extra: str, out: Path | None = None) -> int:
    args = _parse(dataset, *extra, out=out)
    return args.func(args)


def _stored_maps(dataset, image_id) -> tuple[torch.Tensor, np.ndarray]:
    """The maps as the command reads them (float16 on disk)."""
    maps, classes = load_maps(dataset["maps"] / f"{image_id}.npz")
    return torch.from_numpy(maps), classes


def _image(dataset, image_id) -> np.ndarray:
    return np.asarray(Image.open(dataset["root"] / "JPEGImages" / f"{image_id}.png").convert("RGB"))


def test_threshold_labels_are_scored_perfectly_and_resume(dataset, capsys):
    assert _run(dataset, "--threshold", "0.5") == 0
    for image_id in IDS:
        assert np.array_equal(read_mask(dataset["out"] / f"{image_id}.png", 3), _truth(image_id))
    from wsss.evaluate import evaluate_split

    metrics = evaluate_split(dataset["root"], "train", dataset["out"], progress=False)
    assert metrics["miou"] == pytest.approx(1.0)

    before = {i: (dataset["out"] / f"{i}.png").stat().st_mtime_ns for i in IDS}
    (dataset["out"] / "b.png").unlink()
    capsys.readouterr()
    _run(dataset, "--threshold", "0.5")
    assert "wrote 1 pseudo labels" in capsys.readouterr().out
    after = {i: (dataset["out"] / f"{i}.png").stat().st_mtime_ns for i in IDS}
    assert after["a"] == before["a"] and after["c"] == before["c"]
    assert np.array_equal(read_mask(dataset["out"] / "b.png"), _truth("b"))


def _labels(dataset, out_name: str, image_id: str) -> np.ndarray:
    return read_mask(dataset["tmp"] / out_name / f"{image_id}.png")


def test_refinements_and_rules_match_the_library(dataset):
    _run(dataset, "--two-thresholds", "0.55", "0.35", "--refine", "par", out=dataset["tmp"] / "two")
    _run(dataset, "--completion", "--refine", "pamr", "--cut-threshold", "0.5", out=dataset["tmp"] / "comp")
    _run(dataset, "--psa-alpha", "4", out=dataset["tmp"] / "psa")
    for image_id in IDS:
        maps_t, classes = _stored_maps(dataset, image_id)
        image = _image(dataset, image_id)
        expected = two_threshold_labels(maps_t[None], torch.as_tensor(classes)[None], 0.55, 0.35,
                                        refine=make_refiner("par", image))[0]
        assert np.array_equal(_labels(dataset, "two", image_id), expected.numpy())
        refined = make_refiner("pamr", image)(maps_t[None])[0]
        refined = refined / (refined.amax(dim=(1, 2), keepdim=True) + 1e-5)
        expected = label_completion(refined, classes, None, cut_threshold=0.5)
        assert np.array_equal(_labels(dataset, "comp", image_id), expected.numpy())
        assert np.array_equal(_labels(dataset, "psa", image_id), psa_labels(maps_t, classes, 4).numpy())
    # the clean synthetic maps give the truth back through the refinements
    assert np.array_equal(_labels(dataset, "two", "b"), _truth("b"))


def test_crf_refinement_matches_the_library(dataset):
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (the [crf] extra) is not installed")
    _run(dataset, "--psa-alpha", "1", "--refine", "crf", "--crf-preset", "psa", out=dataset["tmp"] / "crf")
    for image_id in IDS:
        maps_t, classes = _stored_maps(dataset, image_id)
        refiner = make_refiner("crf", _image(dataset, image_id), crf="psa")
        expected = psa_labels(maps_t, classes, 1, refine=refiner)
        assert np.array_equal(_labels(dataset, "crf", image_id), expected.numpy())


def test_psa_confident_labels_use_the_psa_crf_by_default(dataset):
    pytest.importorskip("pydensecrf.densecrf", reason="pydensecrf2 (the [crf] extra) is not installed")
    maps, classes = _maps("c")
    maps[0, :, :4] = 0.4  # (1 - 0.4)^1 > 0.4 > (1 - 0.4)^12: background at alpha 1, foreground at alpha 12
    save_maps(dataset["maps"] / "c.npz", maps, classes)
    _run(dataset, "--psa-confident", "1", "12", out=dataset["tmp"] / "conf")
    _run(dataset, "--psa-confident", "1", "12", "--refine", "none", out=dataset["tmp"] / "conf_raw")
    unsure = 0
    for image_id in IDS:
        maps_t, classes = _stored_maps(dataset, image_id)
        refiner = make_refiner("crf", _image(dataset, image_id), crf="psa")
        expected = psa_confident_labels(maps_t, classes, 1, 12, refine=refiner)
        assert np.array_equal(_labels(dataset, "conf", image_id), expected.numpy())
        raw = _labels(dataset, "conf_raw", image_id)
        assert np.array_equal(raw, psa_confident_labels(maps_t, classes, 1, 12).numpy())
        unsure += int((raw == 255).sum())
    assert unsure == H * 4  # the band the two runs disagree on is left unlabelled
    with pytest.raises(ConfigError, match="wants LOW HIGH"):
        _run(dataset, "--psa-confident", "12", "1", out=dataset["tmp"] / "bad")


def test_affinity_refinement_reads_per_image_affinities(dataset):
    aff_dir = dataset["tmp"] / "aff"
    aff_dir.mkdir()
    rng = np.random.default_rng(5)
    affinities = {}
    for image_id in IDS:
        affinities[image_id] = rng.random((12, 12)).astype(np.float32)
        np.savez(aff_dir / f"{image_id}.npz", affinity=affinities[image_id], grid=np.array([3, 4]))
    _run(dataset, "--threshold", "0.5", "--refine", "affinity", "--affinity", str(aff_dir),
         "--affinity-power", "2", out=dataset["tmp"] / "walk")
    for image_id in IDS:
        maps_t, classes = _stored_maps(dataset, image_id)
        refiner = make_refiner("affinity", None, affinity=torch.from_numpy(affinities[image_id]), grid=(3, 4),
                               affinity_power=2)
        expected = maps_to_labels(maps_t, classes, 0.5, refine=refiner)
        assert np.array_equal(_labels(dataset, "walk", image_id), expected.numpy())
    np.savez(aff_dir / "a.npz", affinity=np.ones((5, 5)), grid=np.array([3, 4]))
    with pytest.raises(DataError, match=r"a\.npz.*not \(N, N\)"):
        _run(dataset, "--threshold", "0.5", "--refine", "affinity", "--affinity", str(aff_dir),
             out=dataset["tmp"] / "walk2")


def test_workers_write_the_same_files_and_report_errors(dataset):
    """One pool start: good images are written as in-process, a bad one is a DataError naming its file."""
    two = ("--two-thresholds", "0.55", "0.35", "--refine", "par")
    _run(dataset, *two, out=dataset["tmp"] / "seq")
    good_c = (dataset["maps"] / "c.npz").read_bytes()
    save_maps(dataset["maps"] / "c.npz", np.zeros((1, H, W + 1), np.float32), [2])
    with pytest.raises(DataError, match=r"c\.npz: maps are 24x33 but image 'c' is 24x32"):
        _run(dataset, *two, "--workers", "2", out=dataset["tmp"] / "pool")
    (dataset["maps"] / "c.npz").write_bytes(good_c)
    _run(dataset, *two, out=dataset["tmp"] / "pool")  # resumes with c alone
    for image_id in IDS:
        assert (dataset["tmp"] / "seq" / f"{image_id}.png").read_bytes() == (
            dataset["tmp"] / "pool" / f"{image_id}.png"
        ).read_bytes()


def test_bad_inputs_are_data_errors(dataset):
    (dataset["maps"] / "c.npz").unlink()
    with pytest.raises(DataError, match=r"c\.npz: maps file not found"):
        _run(dataset, "--threshold", "0.5")
    save_maps(dataset["maps"] / "c.npz", np.zeros((1, H, W), np.float32), [7])
    with pytest.raises(DataError, match=r"c\.npz.*outside the dataset's 3"):
        _run(dataset, "--threshold", "0.5")
    save_maps(dataset["maps"] / "c.npz", np.zeros((1, H, W), np.float32), [0])
    with pytest.raises(DataError, match=r"c\.npz.*background label 0"):
        _run(dataset, "--threshold", "0.5")
    save_maps(dataset["maps"] / "c.npz", np.zeros((1, H // 2, W // 2), np.float32), [2])
    with pytest.raises(DataError, match=r"c\.npz: maps are 12x16 but image 'c' is 24x32"):
        _run(dataset, "--threshold", "0.5")
    assert not (dataset["out"] / "c.png").exists()


def test_bad_options_are_config_errors(dataset):
    with pytest.raises(ConfigError, match="needs --affinity DIR"):
        _run(dataset, "--threshold", "0.5", "--refine", "affinity")
    with pytest.raises(ConfigError, match="only used with --completion"):
        _run(dataset, "--threshold", "0.5", "--saliency", str(dataset["tmp"]))
    with pytest.raises(ConfigError, match="CRF"):
        _run(dataset, "--completion", "--refine", "crf")
    with pytest.raises(SystemExit):  # the rules exclude each other
        _run(dataset, "--threshold", "0.5", "--psa-alpha", "1")


def test_a_method_recipe_gives_the_rule_and_refinement(dataset):
    """--method NAME takes the method's PseudoRecipe; the flags override single settings."""
    choices = {m.name for m in REGISTRY if m.pseudo is not None}
    assert {"baseline", "getam", "acr", "aream"} <= choices
    for name in sorted(choices):
        args = _parse(dataset, "--method", name)
        settings = pseudo_cli.settings_from_args(args, 3, True)
        recipe = REGISTRY.get(name).pseudo
        assert settings.rule == recipe.rule and settings.refine == recipe.refine
        assert (settings.iterations, settings.crf, settings.scale, settings.softmax) == (
            recipe.iterations, recipe.crf, recipe.scale, recipe.softmax)
        assert all(getattr(settings, key) == value for key, value in recipe.params.items())
    args = _parse(dataset, "--method", "aream", "--refine", "none", "--scale", "1", "--no-softmax")
    settings = pseudo_cli.settings_from_args(args, 3, True)
    assert (settings.rule, settings.high, settings.low) == ("two_thresholds", 0.55, 0.35)
    assert (settings.refine, settings.scale, settings.softmax) == ("none", 1.0, False)
    args = _parse(dataset, "--method", "getam", "--cut-threshold", "0.5", "--iterations", "3")
    settings = pseudo_cli.settings_from_args(args, 3, True)
    assert (settings.rule, settings.cut_threshold, settings.iterations, settings.refine) == (
        "completion", 0.5, 3, "pamr")


def test_a_method_recipe_writes_what_its_flags_write(dataset):
    recipe = REGISTRY.get("baseline").pseudo
    assert recipe.rule == "threshold"
    _run(dataset, "--method", "baseline", out=dataset["tmp"] / "recipe")
    _run(dataset, "--threshold", str(recipe.params["bg_threshold"]), "--refine", recipe.refine,
         "--iterations", str(recipe.iterations), out=dataset["tmp"] / "flags")
    for image_id in IDS:
        assert np.array_equal(_labels(dataset, "recipe", image_id), _labels(dataset, "flags", image_id))


def test_exactly_one_rule_or_method(dataset, capsys):
    with pytest.raises(SystemExit):
        _parse(dataset)
    assert "one of the arguments --method --threshold" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(dataset, "--method", "baseline", "--threshold", "0.5")
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the segmentation stage has no pseudo-label recipe
        _parse(dataset, "--method", "segmentation")


def test_limit_labels_the_first_images(dataset, capsys):
    assert _run(dataset, "--threshold", "0.5", "--limit", "2") == 0
    assert sorted(p.stem for p in dataset["out"].glob("*.png")) == list(IDS[:2])
    assert "wrote 2 pseudo labels" in capsys.readouterr().out


def test_threshold_is_the_rule_flag_and_the_old_spelling_warns(dataset):
    new = pseudo_cli.settings_from_args(_parse(dataset, "--threshold", "0.4"), 3, True)
    with pytest.warns(FutureWarning, match="--bg-threshold is deprecated and will be removed; use --threshold"):
        old = pseudo_cli.settings_from_args(_parse(dataset, "--bg-threshold", "0.4"), 3, True)
    assert old == new and new.rule == "threshold" and new.bg_threshold == 0.4
    with pytest.raises(SystemExit):  # the old spelling is in the rule group too: one rule only
        _parse(dataset, "--method", "baseline", "--bg-threshold", "0.5")


def test_crf_is_chosen_as_in_predict(dataset):
    """``--crf-preset P`` alone turns the CRF on (as in ``wsss predict``); with another refinement it is an error."""
    alone = pseudo_cli.settings_from_args(_parse(dataset, "--threshold", "0.4", "--crf-preset", "aream"), 3, True)
    spelled = pseudo_cli.settings_from_args(_parse(dataset, "--threshold", "0.4", "--refine", "crf", "--crf-preset",
                                                   "aream"), 3, True)
    assert alone == spelled and (alone.refine, alone.crf) == ("crf", "aream")
    recipe = pseudo_cli.settings_from_args(_parse(dataset, "--method", "aream", "--crf-preset", "psa"), 3, True)
    assert (recipe.refine, recipe.crf) == ("crf", "psa")
    with pytest.raises(ConfigError, match="--crf-preset psa sets the dense CRF, but --refine is par"):
        pseudo_cli.settings_from_args(_parse(dataset, "--threshold", "0.4", "--refine", "par", "--crf-preset",
                                             "psa"), 3, True)
    with pytest.warns(FutureWarning, match="--crf is deprecated"):
        old = pseudo_cli.settings_from_args(_parse(dataset, "--threshold", "0.4", "--crf", "aream"), 3, True)
    assert old == alone
