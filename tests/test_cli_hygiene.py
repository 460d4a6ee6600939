"""The ``wsss`` command line as a whole: help texts with defaults, lazy imports, exit codes, the registry commands."""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from wsss.cli.main import COMMANDS, EX_ERROR, EX_USAGE, HelpFormatter, build_parser, main
from wsss.data.io import load_maps
from wsss.data.synth import make_synthetic
from wsss.data.voc import VOCDataset
from wsss.localize import Localizer
from wsss.methods import REGISTRY, Method, MethodOptions, register_method, unregister_method
from wsss.models import SegmentationModel, checkpoint, create_model
from wsss.train.config import load_config


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every (nested) subparser of ``parser`` by its prog."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out[sub.prog] = sub
                out.update(_subparsers(sub))
    return out


def _command_parser(name: str) -> argparse.ArgumentParser:
    return _subparsers(build_parser([name]))[f"wsss {name}"]


def _run_wsss(*argv: str) -> subprocess.CompletedProcess:
    code = "import sys; from wsss.cli.main import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", [name for name, _, _ in COMMANDS])
def test_every_option_has_help_and_shows_its_default(name, capsys):
    parser = _command_parser(name)
    parsers = [parser, *_subparsers(parser).values()]
    for p in parsers:
        assert p.formatter_class is HelpFormatter, p.prog
        formatter = p._get_formatter()
        alternatives = {a for g in p._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action in p._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(
                    action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{p.prog} {action.option_strings} has no help"
            shown = formatter._get_help_string(action)
            assert action.nargs == 0 or action.required or action in alternatives or "default" in shown, (
                p.prog, action.option_strings)
            if action.nargs != 0 and action.default not in (None, argparse.SUPPRESS):
                # The value itself is shown, not only the word: "(default: 4)".
                expanded = formatter._expand_help(action)
                spelled = (" ".join(map(str, action.default)) if isinstance(action.default, (list, tuple))
                           else str(action.default))  # as typed on the command line: "train val"
                assert str(action.default) in expanded or spelled in expanded, (p.prog, action.option_strings)
        for action in p._actions:  # positionals too
            if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
                assert action.help and action.help != argparse.SUPPRESS, f"{p.prog} {action.dest} has no help"
        with pytest.raises(SystemExit) as info:
            p.parse_args(["--help"])
        assert info.value.code == 0
        assert "wsss localize" not in capsys.readouterr().out  # the command is `wsss cam`


def test_the_table_matches_the_commands():
    for name, _, help_text in COMMANDS:
        action = next(a for a in build_parser([name])._actions if isinstance(a, argparse._SubParsersAction))
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        assert helps[name] == help_text, name


def test_main_help_and_version_do_not_import_torch():
    code = ("import sys\nfrom wsss.cli.main import main\nfor argv in (['--help'], ['--version']):\n"
            "    try:\n        main(argv)\n    except SystemExit as exc:\n        assert exc.code == 0\n"
            "print('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.strip().endswith("False")
    assert "wsss 0." in out and "exit status" in out
    assert all(name in out for name, _, _ in COMMANDS)


def test_a_usage_error_and_a_wsss_error_exit_differently(tmp_path):
    usage = _run_wsss("pseudo", "--maps", str(tmp_path))  # required options missing
    assert usage.returncode == EX_USAGE == 64
    assert usage.stderr.startswith("usage: wsss pseudo") and "error: the following arguments" in usage.stderr
    assert _run_wsss("no-such-command").returncode == EX_USAGE
    assert _run_wsss("--help").returncode == 0
    wsss_error = _run_wsss("pseudo", "--maps", str(tmp_path / "missing"), "--data", str(tmp_path), "--split", "val",
                           "--out", str(tmp_path / "out"), "--threshold", "0.5")
    assert wsss_error.returncode == EX_ERROR == 2
    lines = [line for line in wsss_error.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "maps folder not found" in lines[0]


@pytest.mark.parametrize("bad", [["--scales", "1", "0"], ["--limit", "0"], ["--device", "gpu"],
                                 ["--std", "0.5", "0", "0.5"], ["--method", "nope"]])
def test_bad_option_values_are_usage_errors(bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["cam", "--checkpoint", "x", "--data", "y", "--split", "val", "--out", str(tmp_path), *bad])
    assert info.value.code == EX_USAGE
    assert f"argument {bad[0]}" in capsys.readouterr().err


def test_methods_json_lists_the_methods_with_their_options(capsys):
    assert main(["methods", "--json"]) == 0
    entries = {m["name"]: m for m in json.loads(capsys.readouterr().out)["methods"]}
    assert {"baseline", "getam", "acr", "aream"} <= set(entries)
    assert entries["acr"]["options"]["alpha"] == {"type": "float", "default": 125.0, "description": None}
    assert set(entries["getam"]["options"]) == set(REGISTRY.get("getam").options.model_fields)
    assert entries["aream"]["pseudo"]["rule"] == "two_thresholds"
    assert entries["baseline"]["own_map"] == "cam" and entries["baseline"]["aliases"] == ["classification"]
    assert {"baseline_camvid", "baseline_demo"} <= set(entries["baseline"]["presets"])
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "alpha: float = 125.0" in text and "cam (own)" in text


class RampOptions(MethodOptions):
    gain: float = 1.0


class RampLocalizer(Localizer):
    """A left-to-right ramp for every class."""

    def token_maps(self, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        ramp = torch.linspace(0, 1, w, device=images.device).expand(h, w)
        return ramp.expand(images.shape[0], classes.shape[1], h, w).clone()


@pytest.fixture
def ramp_method():
    method = register_method(Method(name="ramp", summary="a ramp, for tests", maps={"ramp": RampLocalizer},
                                    own_map="ramp", options=RampOptions))
    yield method
    unregister_method("ramp")


def _tiny_checkpoint(path, data, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    classes = VOCDataset(data, "val").classes
    model = create_model("vit_nano_patch16", num_classes=classes.num_fg, img_size=(32, 32))
    spec = checkpoint.describe(model, "vit_nano_patch16", classes=classes.names, mean=mean, std=std)
    checkpoint.save(path, model, spec)
    return model, spec


def _cam_help(capsys) -> str:
    with pytest.raises(SystemExit):
        main(["cam", "--help"])
    return capsys.readouterr().out


def test_a_method_registered_here_is_everywhere(ramp_method, tmp_path, capsys):
    help_text = _cam_help(capsys)
    assert "ramp" in help_text.split("--method {")[1].split("}")[0].split(",")
    cfg = load_config(None, ["method.name=ramp", "method.gain=2", "val.method=ramp"])
    assert cfg["method"] == {"name": "ramp", "gain": 2.0} and cfg["val"]["method"] == "ramp"
    assert main(["methods", "--json"]) == 0
    assert "ramp" in {m["name"] for m in json.loads(capsys.readouterr().out)["methods"]}

    data = make_synthetic(tmp_path / "data", num_train=2, num_val=2, size=32, num_classes=2, seed=3)
    _tiny_checkpoint(tmp_path / "model.safetensors", data)
    out = tmp_path / "maps"
    assert main(["cam", "--checkpoint", str(tmp_path / "model.safetensors"), "--data", str(data), "--split", "val",
                 "--method", "ramp", "--out", str(out), "--device", "cpu", "--map-resolution", "full"]) == 0
    files = sorted(out.glob("*.npz"))
    assert len(files) == 2
    for path in files:  # the plug-in's own formula made them: 0 on the left edge, 1 on the right one
        maps = load_maps(path)[0]
        assert np.allclose(maps[..., 0], 0, atol=1e-3) and np.allclose(maps[..., -1], 1, atol=1e-3)
    unregister_method("ramp")
    assert "ramp" not in _cam_help(capsys)


def test_upgrade_checkpoint_writes_the_normalisation(tmp_path, capsys):
    data = make_synthetic(tmp_path / "data", num_train=2, num_val=2, size=32, num_classes=2, seed=3)
    path = tmp_path / "old.safetensors"
    model, spec = _tiny_checkpoint(path, data)
    # A version-1 file: the architecture and classes, no normalisation, no run folder beside it.
    old = {"name": spec.arch, "head": spec.head, "pool": spec.pool, "num_classes": spec.num_classes,
           "img_size": list(spec.img_size), "classes": spec.classes}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={checkpoint.META_KEY: json.dumps(old)})
    assert main(["cam", "--checkpoint", str(path), "--data", str(data), "--split", "val", "--out",
                 str(tmp_path / "m")]) == EX_ERROR
    assert "wsss upgrade-checkpoint" in capsys.readouterr().err
    assert main(["upgrade-checkpoint", str(path), "--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224",
                 "0.225", "--method", "baseline"]) == 0
    upgraded = checkpoint.read_spec(path)
    assert upgraded.mean == pytest.approx((0.485, 0.456, 0.406)) and upgraded.method == "baseline"
    assert upgraded.classes == spec.classes
    assert main(["upgrade-checkpoint", str(path), "--mean", "0", "0", "0", "--std", "1", "1", "1"]) == EX_ERROR


def test_predict_takes_the_spec_and_a_limit(tmp_path, capsys, caplog):
    data = make_synthetic(tmp_path / "data", num_train=2, num_val=3, size=32, num_classes=2, seed=3)
    classes = VOCDataset(data, "val").classes
    backbone = create_model("vit_nano_patch16", num_classes=0, img_size=(32, 32))
    model = SegmentationModel(backbone, classes.num_classes, dim=8)
    path = tmp_path / "seg.safetensors"
    checkpoint.save(path, model, checkpoint.describe(model, "vit_nano_patch16", classes=classes.names,
                                                     mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2)))
    common = ["predict", "--checkpoint", str(path), "--data", str(data), "--split", "val", "--device", "cpu"]
    with caplog.at_level(logging.WARNING):
        assert main([*common, "--out", str(tmp_path / "pred"), "--limit", "2", "--std", "0.2", "0.2", "0.3"]) == 0
    assert len(list((tmp_path / "pred").glob("*.png"))) == 2
    assert any("--std 0.2 0.2 0.3 contradicts the checkpoint's std 0.2 0.2 0.2" in r.getMessage()
               for r in caplog.records)
    classifier = tmp_path / "classifier.safetensors"
    _tiny_checkpoint(classifier, data)
    assert main(["predict", "--checkpoint", str(classifier), "--data", str(data), "--split", "val",
                 "--out", str(tmp_path / "none")]) == EX_ERROR
    assert "is a classification model" in capsys.readouterr().err


def _usage(command: str, tmp_path) -> list[str]:
    """The required arguments of ``command``, pointing at ``tmp_path`` (never read: a bad value stops the parse)."""
    d = str(tmp_path)
    return {
        "cam": ["cam", "--checkpoint", d, "--data", d, "--split", "val", "--out", d],
        "pseudo": ["pseudo", "--maps", d, "--data", d, "--split", "val", "--out", d],
        "pseudo-rule": ["pseudo", "--maps", d, "--data", d, "--split", "val", "--out", d, "--threshold", "0.5"],
        "eval": ["eval", "--data", d, "--split", "val", "--pred", d],
        "eval-sweep": ["eval", "--data", d, "--split", "val", "--pred", d, "--sweep"],
        "check-data": ["check-data", "--data", d, "--split", "val"],
        "prepare-voc": ["prepare", "voc", "--voc", d, "--sbd", d, "--out", d],
        "prepare-coco": ["prepare", "coco", "--coco", d],
        "upgrade": ["upgrade-checkpoint", d, "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5"],
    }[command]


@pytest.mark.parametrize("command, bad", [
    ("cam", ["--threshold", "1.5"]),
    ("cam", ["--threshold", "nan"]),
    ("cam", ["--start-layer", "1.5"]),
    ("pseudo", ["--threshold", "-0.1"]),
    ("pseudo", ["--two-thresholds", "0.55", "1.2"]),
    ("pseudo", ["--psa-alpha", "0"]),
    ("pseudo-rule", ["--scale", "0"]),
    ("pseudo-rule", ["--scale", "1.5"]),
    ("pseudo-rule", ["--cut-threshold", "2"]),
    ("pseudo-rule", ["--affinity-power", "-1"]),
    ("eval", ["--threshold", "nan"]),
    ("eval-sweep", ["--thresholds", "0", "inf", "0.1"]),
    ("check-data", ["--max-pixels", "0"]),
    ("check-data", ["--workers", "-1"]),
    ("check-data", ["--max-problems", "-2"]),
    ("prepare-voc", ["--workers", "-1"]),
    ("prepare-coco", ["--year", "0"]),
    ("upgrade", ["--mean", "0.5", "nan", "0.5"]),
    ("upgrade", ["--std", "0.5", "0", "0.5"]),
])
def test_out_of_range_values_are_usage_errors_naming_the_flag(command, bad, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([*_usage(command, tmp_path), *bad])
    assert info.value.code == EX_USAGE
    assert f"argument {bad[0]}" in capsys.readouterr().err


@pytest.mark.parametrize("command, good", [
    ("cam", ["--threshold", "0", "--start-layer", "0"]),
    ("cam", ["--threshold", "1", "--start-layer", "-1"]),  # a negative block counts from the last
    ("pseudo-rule", ["--scale", "1", "--affinity-power", "0.5"]),
    ("eval-sweep", ["--thresholds", "0", "1", "0.01"]),
    ("check-data", ["--max-pixels", "1000", "--workers", "0", "--max-problems", "0"]),
])
def test_in_range_values_parse(command, good, tmp_path):
    args = build_parser([_usage(command, tmp_path)[0]]).parse_args([*_usage(command, tmp_path), *good])
    assert callable(args.func)


BAR_AND_LOG = """
import logging, sys
from tqdm import tqdm
import wsss.cli.methods as command

def run(args):  # a command that logs while its progress bar is drawn
    bar = tqdm(total=2, desc="work", file=sys.stderr)
    bar.update(1)
    logging.getLogger("wsss.test").info("a log line")
    bar.update(1)
    bar.close()
    return 0

command.run = run
from wsss.cli.main import main
sys.exit(main(["methods"]))
"""


def test_log_lines_do_not_break_the_progress_bar():
    result = subprocess.run([sys.executable, "-c", BAR_AND_LOG], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stderr.split("\n") if "a log line" in line]
    # tqdm.write clears the bar first (a carriage return), so the line ends as the log line alone; logging
    # straight to stderr would append it to the bar's text ("work:  50%|...| 1/2 [...]INFO a log line").
    assert line.split("\r")[-1] == "INFO a log line"
    assert "work: 100%" in result.stderr  # the bar is still drawn
