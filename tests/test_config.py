"""Configs: typed defaults, presets, overrides parsed as YAML, bad keys and values refused by name, round trips."""

from __future__ import annotations

import pytest

from wsss.cli.main import build_parser, main
from wsss.errors import ConfigError
from wsss.methods import REGISTRY
from wsss.settings import flatten
from wsss.train.config import DEFAULTS, dump_config, load_config, parse_override, parse_yaml, preset_names


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["optim.lr=1e-4", "val.scales=[1, 0.5]", "model.weights=null", "train.amp=true",
                             "train.grad_clip=2", "optim.min_lr=2.5E-5", "run_dir=runs/a=b", "data.split=val"])
    assert cfg["optim"]["lr"] == 1e-4 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["val"]["scales"] == [1.0, 0.5]
    assert cfg["model"]["weights"] is None
    assert cfg["train"]["amp"] is True
    assert cfg["train"]["grad_clip"] == 2.0 and isinstance(cfg["train"]["grad_clip"], float)  # ints pass for floats
    assert cfg["optim"]["min_lr"] == 2.5e-5
    assert cfg["run_dir"] == "runs/a=b"  # only the first '=' separates key and value
    assert cfg["data"]["split"] == "val"


def test_yaml_numbers_in_exponent_form_are_floats():
    assert parse_yaml("[1e-4, 1E5, -2e+3, 1.0e-3, .5, 7, .inf]") == [1e-4, 1e5, -2e3, 1e-3, 0.5, 7, float("inf")]
    assert parse_yaml("'1e-4'") == "1e-4" and parse_yaml("x1e5") == "x1e5"
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}


@pytest.mark.parametrize("override, key, problem", [
    ("train.log_every=0", "train.log_every", "greater than or equal to 1"),
    ("train.grad_clip=fast", "train.grad_clip", "valid number"),
    ("data.batch_size=0", "data.batch_size", "greater than or equal to 1"),
    ("data.batch_size=-1", "data.batch_size", "greater than or equal to 1"),
    ("train.steps=0", "train.steps", "greater than or equal to 1"),
    ("train.steps=1e3", "train.steps", "valid integer"),
    ("train.amp=1", "train.amp", "valid boolean"),
    ("optim.schedule=cosin", "optim.schedule", "'cosine', 'poly' or 'constant'"),
    ("optim.lr=-1", "optim.lr", "greater than 0"),
    ("optim.lr=.nan", "optim.lr", "finite"),
    ("optim.lr=.inf", "optim.lr", "finite"),
    ("model.head=foo", "model.head", "token, gap, conv, mct"),
    ("model.name=vit_huge", "model.name", "vit_tiny_patch16_224"),
    ("model.drop_path_rate=1", "model.drop_path_rate", "less than 1"),
    ("data.num_workers=-1", "data.num_workers", "greater than or equal to 0"),
    ("data.transforms.crop=big", "data.transforms.crop", "positive integer or a \\[height, width\\]"),
    ("data.transforms.interpolation=nearest", "data.transforms.interpolation", "'bilinear' or 'bicubic'"),
    ("data.transforms.color_jitter=[0.1, 0.1, 0.1, 0.9]", "data.transforms.color_jitter", "hue"),
    ("data.transforms.mean=null", "data.transforms", "both mean and std"),
    ("device=gpu", "device", "auto, cpu, cuda or cuda:N"),
    ("val.method=nope", "val.method", "cam"),
    ("val.scales=[]", "val.scales", "at least 1"),
    ("val.scales=[1, 0]", "val.scales.1", "greater than 0"),
    ("val.thresholds=[0.5, 0.1, 0.1]", "val.thresholds", "stop > start"),
    ("method.name=nope", "method.name", "baseline"),
    ("method.alpha=1", "method.alpha", "options of method 'baseline': none"),
    ("optim.wieght_decay=0.1", "optim.wieght_decay", "known at this level: name, lr, weight_decay"),
    ("trian.steps=3", "trian", "known at this level: seed, run_dir"),
    ("model.name.x=1", "model.name", "valid string"),
    ("model=vit_tiny_patch16_224", "model", "valid dictionary"),  # would silently replace the whole section
])
def test_a_bad_value_is_a_config_error_naming_the_key(override, key, problem):
    with pytest.raises(ConfigError, match=rf"'{key.replace('.', '[.]')}'.*{problem}"):
        load_config(None, [override])


def test_every_problem_is_one_line():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.log_every=0", "optim.lr=-1", "method.name=acr", "method.alpha=x"])
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert [line.split("'")[1] for line in lines] == ["optim.lr", "train.log_every", "method.alpha"]


def test_bad_values_stop_wsss_train_before_it_starts(tmp_path, capsys):
    code = main(["train", "--config", "baseline_demo", f"data.root={tmp_path / 'nowhere'}",
                 f"run_dir={tmp_path / 'run'}",
                 "train.log_every=0", "train.grad_clip=fast"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'train.log_every'" in err and "'train.grad_clip'" in err
    assert not (tmp_path / "run").exists()


def test_a_good_override_changes_exactly_that_key():
    base = flatten(load_config("baseline_demo"))
    cases = [("optim.lr=3e-4", "optim.lr", 3e-4), ("data.transforms.crop=[96, 64]", "data.transforms.crop", [96, 64]),
             ("val.limit=7", "val.limit", 7), ("train.grad_clip=1.5", "train.grad_clip", 1.5),
             ("device=cuda:1", "device", "cuda:1")]
    for override, key, value in cases:
        changed = flatten(load_config("baseline_demo", [override]))
        assert changed[key] == value
        assert {k for k in base if base[k] != changed[k]} == {key}, override


def test_a_partial_section_merges():
    cfg = load_config(None, ["optim={lr: 0.1}"])
    assert cfg["optim"]["lr"] == 0.1 and cfg["optim"]["name"] == "adamw"


def test_method_options_are_typed_and_resolved_with_every_default():
    cfg = load_config(None, ["method.name=acr", "method.alpha=50"])
    assert cfg["method"] == {"name": "acr", **REGISTRY.get("acr").options().model_dump(), "alpha": 50.0}
    # the old name of the baseline resolves to its canonical one
    assert load_config(None, ["method.name=classification"])["method"] == {"name": "baseline"}
    with pytest.raises(ConfigError, match=r"'method\.alpha'.*valid number"):
        load_config(None, ["method.name=acr", "method.alpha=fast"])


def test_transforms_keep_the_meaning_of_build_transforms():
    t = load_config(None)["data"]["transforms"]
    assert t["crop"] == 224 and t["hflip"] is True and t["crop_mode"] == "random" and t["scale"] is None
    # giving a scale selects the random resized crop, with timm's ratio
    t = load_config(None, ["data.transforms.scale=[0.5, 1]"])["data"]["transforms"]
    assert t["crop_mode"] == "resized" and t["scale"] == [0.5, 1.0] and t["ratio"] == [3 / 4, 4 / 3]
    assert load_config(None, ["data.transforms.hflip=0.3"])["data"]["transforms"]["hflip"] == 0.3
    with pytest.raises(ConfigError, match="only apply to crop_mode resized"):
        load_config(None, ["data.transforms.crop_mode=center", "data.transforms.scale=[0.5, 1]"])


def test_bad_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="empty key"):
        load_config(None, ["optim..lr=1"])
    with pytest.raises(ConfigError, match="no such config file or preset"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  lr: 1e-3\n  wieght_decay: 0.1\n")
    with pytest.raises(ConfigError, match="optim.wieght_decay"):
        load_config(typo)


def test_file_then_overrides_in_order(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: 3e-4\n  schedule: poly\ntrain:\n  steps: 50\n")
    cfg = load_config(path, ["train.steps=60", "train.steps=70"])
    assert cfg["optim"]["lr"] == 3e-4 and cfg["optim"]["schedule"] == "poly" and cfg["train"]["steps"] == 70
    # a bad value of the file is fine when an override replaces it
    path.write_text("train:\n  log_every: 0\n")
    assert load_config(path, ["train.log_every=5"])["train"]["log_every"] == 5


def test_every_shipped_preset_loads_and_validates():
    names = preset_names()
    assert "baseline_demo" in names and set(REGISTRY.presets()) <= set(names)
    shape = {key for key in flatten(DEFAULTS) if not key.startswith("method.")}
    for name in names:
        cfg = load_config(name)
        assert {key for key in flatten(cfg) if not key.startswith("method.")} == shape, name
        assert set(cfg["method"]) == {"name", *REGISTRY.get(cfg["method"]["name"]).options.model_fields}, name
    demo = load_config("baseline_demo")
    assert demo["model"]["name"] == "vit_pico_patch8" and demo["optim"]["lr"] == 1e-3
    assert load_config() == DEFAULTS


def test_dump_and_load_round_trip(tmp_path):
    cfg = load_config("aream_voc", ["optim.lr=1e-4", "optim.min_lr=1e-20", "val.limit=7",
                                    "method.layer_weights=[0.5, 2]", "run_dir=runs/x y"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_print_config_shows_every_key_and_reloads_to_the_same_dict(tmp_path, capsys):
    assert main(["train", "--config", "getam_voc", "optim.lr=0.01", "--print-config"]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "printed.yaml"
    path.write_text(printed)
    cfg = load_config("getam_voc", ["optim.lr=0.01"])
    assert load_config(path) == cfg
    assert set(flatten(parse_yaml(printed))) == set(flatten(cfg))
    assert "authors_sgd_quirk" in printed and "grad_power" in printed


def test_train_command_line():
    parser = build_parser(["train"])
    args = parser.parse_args(["train", "--config", "baseline_demo", "optim.lr=1e-4", "--resume", "--local-rank",
                              "1"])
    assert args.overrides == ["optim.lr=1e-4"] and args.resume is True and args.local_rank == 1
    args = parser.parse_args(["train", "--config", "baseline_demo", "--local_rank=0"])
    assert args.resume is False and args.local_rank == 0 and args.print_config is False


def test_a_bad_device_is_a_config_error():
    from wsss.device import resolve_device
    with pytest.raises(ConfigError, match="device"):
        resolve_device("gpu")
    assert resolve_device("cpu").type == "cpu"
