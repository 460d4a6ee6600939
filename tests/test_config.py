"""Configs: defaults, presets, overrides parsed as YAML, unknown keys and kind changes refused, round trips."""

from __future__ import annotations

import copy

import pytest

from wsss.cli.main import build_parser
from wsss.errors import ConfigError
from wsss.train.config import DEFAULTS, dump_config, load_config, parse_override, parse_yaml, preset_names


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(None, ["optim.lr=1e-4", "val.scales=[1, 0.5]", "model.weights=null", "train.amp=true",
                             "train.grad_clip=2", "optim.min_lr=-2.5E-3", "run_dir=runs/a=b", "data.split=val"])
    assert cfg["optim"]["lr"] == 1e-4 and isinstance(cfg["optim"]["lr"], float)
    assert cfg["val"]["scales"] == [1, 0.5]
    assert cfg["model"]["weights"] is None
    assert cfg["train"]["amp"] is True
    assert cfg["train"]["grad_clip"] == 2
    assert cfg["optim"]["min_lr"] == -2.5e-3
    assert cfg["run_dir"] == "runs/a=b"  # only the first '=' separates key and value
    assert cfg["data"]["split"] == "val"
    # Everything else keeps its default, and DEFAULTS itself is untouched.
    assert cfg["optim"]["weight_decay"] == DEFAULTS["optim"]["weight_decay"]
    assert DEFAULTS["optim"]["lr"] == 1e-4 and DEFAULTS["train"]["amp"] is False


def test_yaml_numbers_in_exponent_form_are_floats():
    assert parse_yaml("[1e-4, 1E5, -2e+3, 1.0e-3, .5, 7, .inf]") == [1e-4, 1e5, -2e3, 1e-3, 0.5, 7, float("inf")]
    assert parse_yaml("'1e-4'") == "1e-4" and parse_yaml("x1e5") == "x1e5"
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}


@pytest.mark.parametrize("override, key", [("optim.lrr=1", "optim.lrr"), ("trian.steps=3", "trian"),
                                           ("model.name.x=1", "model.name")])
def test_unknown_keys_are_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize("override, expected", [
    ("model=vit_tiny_patch16_224", "section"),  # would silently replace the whole model section
    ("optim={lr: 0.1}", None),  # a partial section merges: allowed
    ("train.steps=1e3", "integer"),
    ("train.amp=1", "boolean"),
    ("optim.lr=fast", "number"),
    ("val.scales=1.0", "list"),
    ("data.batch_size=null", "integer"),
])
def test_values_keep_the_kind_of_their_default(override, expected):
    if expected is None:
        cfg = load_config(None, [override])
        assert cfg["optim"]["lr"] == 0.1 and cfg["optim"]["name"] == "adamw"
        return
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_open_sections_take_new_keys():
    cfg = load_config(None, ["method.name=acr", "method.alpha=0.5", "method.nested={a: 1}",
                             "data.transforms.color_jitter=[0.3, 0.3, 0.3, 0.1]", "data.transforms.crop=[96, 64]"])
    assert cfg["method"] == {"name": "acr", "alpha": 0.5, "nested": {"a": 1}}
    assert cfg["data"]["transforms"] == {"crop": [96, 64], "hflip": True, "color_jitter": [0.3, 0.3, 0.3, 0.1]}


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


def test_every_shipped_preset_loads_by_name():
    names = preset_names()
    assert "demo" in names
    for name in names:
        cfg = load_config(name)
        assert set(cfg) == set(DEFAULTS), name
    demo = load_config("demo")
    assert demo["model"]["name"] == "vit_pico_patch8" and demo["optim"]["lr"] == 1e-3


def test_dump_and_load_round_trip(tmp_path):
    cfg = load_config("demo", ["optim.lr=1e-4", "optim.min_lr=1e-20", "val.limit=7", "method.beta=[0.5, 2]",
                               "run_dir=runs/x y"])
    original = copy.deepcopy(cfg)
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg == original


def test_train_command_line():
    parser = build_parser()
    args = parser.parse_args(["train", "--config", "demo", "optim.lr=1e-4", "--resume", "--local-rank", "1"])
    assert args.overrides == ["optim.lr=1e-4"] and args.resume is True and args.local_rank == 1
    args = parser.parse_args(["train", "--config", "demo", "--local_rank=0"])
    assert args.resume is False and args.local_rank == 0


def test_a_bad_device_is_a_config_error():
    from wsss.train.engine import pick_device
    with pytest.raises(ConfigError, match="device"):
        pick_device("gpu")
    assert pick_device("cpu").type == "cpu"
