"""Bad input of every kind ends in one ``error: ...`` line naming the key or file, exit status 2, no traceback
(unless ``wsss -v``), and nothing written that a rerun would trust.

A few cases run the command in a subprocess, as a user would (with the presets' two data workers where data is
loaded); the others call :func:`wsss.cli.main.main` in-process, which is the same code path and much faster."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wsss.cli.main import EX_ERROR, EX_USAGE, main, os_error_message
from wsss.data.synth import make_synthetic
from wsss.errors import CheckpointError, ConfigError, DataError, WSSSError
from wsss.models import create_model
from wsss.train import load_config
from wsss.train.engine import TrainingDiverged

REPO = Path(__file__).resolve().parents[1]
WORKERS = 2  # the presets' data.num_workers


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synth") / "data", num_train=8, num_val=2, size=32)


def tiny_config(path: Path, root: Path, run_dir: Path, **sections: dict) -> Path:
    """A 4-block ViT on 32-px crops, 2 steps, the presets' worker count."""
    cfg = {"run_dir": str(run_dir), "device": "cpu", "model": {"name": "vit_nano_patch16"},
           "data": {"root": str(root), "batch_size": 4, "num_workers": WORKERS, "transforms": {"crop": 32}},
           "optim": {"lr": 1e-3}, "train": {"steps": 2, "log_every": 1, "ckpt_every": 2}}
    for key, values in sections.items():
        cfg[key] = {**cfg.get(key, {}), **values}
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def wsss(*argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python -m wsss.cli.main ARGV`` in a subprocess."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "wsss.cli.main", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)


def error_line(code: int, err: str, *names: str, status: int = EX_ERROR) -> str:
    """The last stderr line, checked: exit status, ``error:`` first, every name in it, no traceback."""
    assert code == status, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for name in names:
        assert str(name) in last, (name, last)
    return last


def run_main(capsys, *argv: str, status: int = EX_ERROR) -> str:
    """``main(argv)`` in-process: its error line (see :func:`error_line`)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # a usage error
        code = exc.code
    return error_line(code, capsys.readouterr().err, status=status)


def untrusted(run: Path) -> bool:
    """Nothing a rerun or a later command would take for a result."""
    return not (run / "model.safetensors").exists() and not (run / "checkpoints" / "latest").exists()


# ----------------------------------------------------------------------------------------- errors across processes

def _instances() -> list[WSSSError]:
    classes, todo = [], [WSSSError]
    while todo:
        cls = todo.pop()
        classes.append(cls)
        todo += cls.__subclasses__()
    out = []
    for cls in classes:
        exc = cls("/data/x.jpg", "cannot decode image") if issubclass(cls, DataError) else None
        if exc is None:
            try:
                exc = cls("a problem")
            except TypeError:  # another signature: its own module's tests cover it
                continue
        exc.extra = [1, "two"]  # fields set on the instance survive too
        out.append(exc)
    return out


def test_every_wsss_error_pickles_with_its_fields():
    instances = _instances()
    assert {DataError, CheckpointError, ConfigError, TrainingDiverged} <= {type(e) for e in instances}
    for exc in instances:
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc) and back.extra == [1, "two"]
        if isinstance(exc, DataError):
            assert back.path == Path("/data/x.jpg") and back.problem == "cannot decode image"


def test_a_corrupt_image_read_by_data_workers_is_the_one_line_data_error(data, tmp_path):
    root = tmp_path / "data"
    make_synthetic(root, num_train=8, num_val=2, size=32)
    bad = root / "JPEGImages" / "train_00003.jpg"
    bad.write_bytes(b"garbage bytes, not a JPEG")
    run = tmp_path / "run"
    result = wsss("train", "--config", str(tiny_config(tmp_path / "tiny.yaml", root, run)))
    error_line(result.returncode, result.stderr, bad, "cannot decode image")
    assert untrusted(run)


# ------------------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("override, key, allowed", [
    ("data.batch_size=-1", "data.batch_size", "greater than or equal to 1"),  # used to spin forever
    ("data.batch_size=0", "data.batch_size", "greater than or equal to 1"),
    ("train.log_every=0", "train.log_every", "greater than or equal to 1"),
    ("train.steps=0", "train.steps", "greater than or equal to 1"),
    ("train.steps=-3", "train.steps", "greater than or equal to 1"),
    ("train.ckpt_every=-1", "train.ckpt_every", "greater than or equal to 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints", "greater than or equal to 1"),
    ("optim.schedule=cosin", "optim.schedule", "'cosine', 'poly' or 'constant'"),
    ("optim.name=adam", "optim.name", "'adamw' or 'sgd'"),
    ("optim.lr=-1", "optim.lr", "greater than 0"),
    ("optim.lr=.nan", "optim.lr", "finite"),
    ("optim.momentum=1", "optim.momentum", "less than 1"),
    ("optim.min_lr=0.1", "optim.min_lr", "at most optim.lr"),
    ("optim.warmup_steps=-1", "optim.warmup_steps", "greater than or equal to 0"),
    ("model.head=foo", "model.head", "token"),
    ("model.pool=sum", "model.pool", "'avg' or 'max'"),
    ("data.num_workers=-1", "data.num_workers", "greater than or equal to 0"),
    ("data.split=../train", "data.split", "not a path"),
    ("data.root=''", "data.root", "at least 1 character"),
    ("val.split=''", "val.split", "not a path"),
    ("val.method=nope", "val.method", "cam"),
    ("val.every=-2", "val.every", "greater than or equal to 0"),
    ("seed=-1", "seed", "greater than or equal to 0"),
    ("seed=99999999999", "seed", "less than 4294967296"),
    ("method.name=nope", "method.name", "baseline"),
    ("device=gpu", "device", "auto, cpu, cuda or cuda:N"),
])
def test_every_bad_value_is_refused_at_load_naming_the_key_and_what_is_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    [line] = str(info.value).splitlines()
    assert f"'{key}'" in line and allowed in line


def test_a_config_error_stops_wsss_train_before_anything_is_written(data, tmp_path):
    run = tmp_path / "run"
    result = wsss("train", "--config", str(tiny_config(tmp_path / "c.yaml", data, run)), "train.steps=0")
    error_line(result.returncode, result.stderr, "'train.steps'", "greater than or equal to 1")
    assert not run.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(data, tmp_path, capsys):
    run = tmp_path / "run"
    line = run_main(capsys, "train", "--config", str(tiny_config(tmp_path / "c.yaml", data, run)), "device=cuda")
    assert "'device' cuda: no CUDA device" in line and "use cpu or auto" in line
    line = run_main(capsys, "cam", "--checkpoint", str(tmp_path), "--data", str(data), "--split", "val", "--out",
                    str(tmp_path / "maps"), "--device", "cuda")
    assert "--device cuda: no CUDA device" in line
    assert untrusted(run)


# ------------------------------------------------------------------------------------------------------- flags

@pytest.mark.parametrize("argv, flag", [
    (["cam", "--scales", "0"], "--scales"),
    (["cam", "--scales", "-1"], "--scales"),
    (["cam", "--scales", "1", "nan"], "--scales"),
    (["cam", "--mean", "0.5", "nan", "0.5"], "--mean"),
    (["synth", "--size", "8"], "--size"),
    (["synth", "--seed", "-1"], "--seed"),
    (["synth", "--bias", "2"], "--bias"),
    (["synth", "--num-train", "-5"], "--num-train"),
    (["train", "--local-rank", "-1"], "--local-rank"),
])
def test_a_bad_flag_value_is_a_usage_error_naming_the_flag(argv, flag, tmp_path, capsys):
    required = {"cam": ["--checkpoint", "x", "--data", "y", "--split", "val", "--out", str(tmp_path / "o")],
                "synth": ["--out", str(tmp_path / "o")], "train": ["--config", "x"]}[argv[0]]
    line = run_main(capsys, *argv, *required, status=EX_USAGE)
    assert f"argument {flag}" in line and f"wsss {argv[0]} --help" in line
    assert not (tmp_path / "o").exists()


def test_allow_changes_needs_resume(tmp_path, capsys):
    assert "--resume" in run_main(capsys, "train", "--config", "x", "--allow-changes")


def test_synth_settings_the_generator_checks_are_one_line_too(tmp_path, capsys):
    assert "num_classes must lie in 1..24" in run_main(capsys, "synth", "--out", str(tmp_path / "o"), "--classes", "0")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------- overwriting

def test_synth_refuses_a_folder_that_is_not_its_own(tmp_path, capsys):
    real = tmp_path / "real"
    (real / "ImageSets" / "Segmentation").mkdir(parents=True)
    (real / "classes.txt").write_text("background\ncat\n")
    (real / "ImageSets" / "Segmentation" / "train.txt").write_text("img1\n")
    result = wsss("synth", "--out", str(real), "--num-train", "2", "--num-val", "1", "--size", "16")
    error_line(result.returncode, result.stderr, real, "neither empty nor a synthetic set")
    assert (real / "classes.txt").read_text() == "background\ncat\n"
    assert (real / "ImageSets" / "Segmentation" / "train.txt").read_text() == "img1\n"
    assert not (real / "JPEGImages").exists()
    # A file is refused; a new folder, an empty one, and the same synthetic set again are fine.
    (tmp_path / "file").write_text("x")
    assert "not a folder" in run_main(capsys, "synth", "--out", str(tmp_path / "file"))
    small = ["--num-train", "2", "--num-val", "1", "--size", "16"]
    (tmp_path / "empty").mkdir()
    for out in ("new", "empty", "new"):
        assert main(["synth", "--out", str(tmp_path / out), *small]) == 0
    # The same folder with other settings is refused, naming them, and left as it was.
    before = (tmp_path / "new" / "synth.json").read_bytes()
    line = run_main(capsys, "synth", "--out", str(tmp_path / "new"), *small[:-1], "24", "--seed", "3")
    assert "other settings" in line and "size 16 (asked 24)" in line and "seed 0 (asked 3)" in line
    assert (tmp_path / "new" / "synth.json").read_bytes() == before


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A finished 2-step run (trained in-process), its config file beside it."""
    folder = tmp_path_factory.mktemp("trained")
    config = tiny_config(folder / "c.yaml", data, folder / "run")
    assert main(["train", "--config", str(config)]) == 0
    return folder / "run"


def test_resume_with_changed_settings_is_an_error_unless_allowed(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    config = tmp_path / "c.yaml"
    config.write_text((trained / "config.yaml").read_text().replace(str(trained), str(run)))
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.jsonl", "train.log")}
    result = wsss("train", "--config", str(config), "optim.lr=0.01", "train.steps=3", "--resume")
    line = error_line(result.returncode, result.stderr, run, "optim.lr: 0.001 -> 0.01", "--allow-changes")
    assert "train.steps" not in line
    assert {name: (run / name).read_bytes() for name in before} == before  # config.yaml kept, log untouched
    # Another optimiser: a named error too (it was KeyError: 'momentum' at the first step) ...
    line = run_main(capsys, "train", "--config", str(config), "optim.name=sgd", "--resume")
    assert "optim.name: 'adamw' -> 'sgd'" in line
    # ... and with --allow-changes a fresh optimiser state, recorded in the run log with the other changes.
    assert main(["train", "--config", str(config), "optim.name=sgd", "train.steps=3", "--resume",
                 "--allow-changes"]) == 0
    log_text = (run / "train.log").read_text()
    assert "(--allow-changes): optim.name: 'adamw' -> 'sgd'" in log_text and "starts afresh" in log_text
    assert load_config(run / "config.yaml")["optim"]["name"] == "sgd"


def test_damaged_checkpoints_are_named(trained, data, tmp_path, capsys):
    model = create_model("vit_nano_patch16", num_classes=4)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    cam = ["--data", str(data), "--split", "val", "--out", str(tmp_path / "maps"), "--device", "cpu"]
    for meta, problem in [("{not json", "not valid JSON"), ('{"version": 2, "arch": 5}', "arch should be"),
                          ('{"version": 2, "arch": "vit_nope"}', "cannot be built")]:
        path = tmp_path / "bad.safetensors"
        save_file(weights, str(path), metadata={"wsss_model": meta})
        assert problem in run_main(capsys, "cam", "--checkpoint", str(path), *cam)
    path.write_bytes(b"\x00" * 64)
    assert "cannot read safetensors file" in run_main(capsys, "cam", "--checkpoint", str(path), *cam)
    assert not (tmp_path / "maps").exists()
    # A run whose training state or checkpoint pointer is damaged does not resume.
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    config = tmp_path / "c.yaml"
    config.write_text((trained / "config.yaml").read_text().replace(str(trained), str(run)))
    (run / "checkpoints" / "step_0000002" / "state.pt").write_bytes(b"not a torch file")
    line = run_main(capsys, "train", "--config", str(config), "train.steps=3", "--resume")
    assert "state.pt: cannot read training state" in line
    (run / "checkpoints" / "latest").write_text("../../elsewhere")
    assert "should name a checkpoint folder" in run_main(capsys, "train", "--config", str(config), "--resume")


# --------------------------------------------------------------------------------------------------- the disk

def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_trusted(data, tmp_path, capsys, monkeypatch):
    real_write = Path.write_bytes

    def full(path: Path, payload: bytes) -> int:
        if path.name.startswith(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: no file named
        return real_write(path, payload)

    monkeypatch.setattr(Path, "write_bytes", full)
    for target, named in [(".config.yaml", "config.yaml"), ("state.pt", "state.pt"),
                          (".model.safetensors", "model.safetensors")]:
        run = tmp_path / named
        config = tiny_config(tmp_path / f"{named}.yaml", data, run, data={"num_workers": 0})
        line = run_main(capsys, "train", "--config", str(config))
        assert named in line and "no space left on the device; free some space" in line, line
        assert untrusted(run)
        leftovers = [p for p in run.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
        assert not leftovers, leftovers


@pytest.mark.parametrize("exc, expected", [
    (OSError(errno.ENOSPC, "No space left on device", "/out/x.png"), "/out/x.png: no space left on the device"),
    (PermissionError(errno.EACCES, "Permission denied", "/out"), "/out: permission denied; check the permissions"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/in/x"), "/in/x: no such file or directory"),
    (OSError(errno.EROFS, "Read-only file system", "/ro"), "/ro: read-only file system"),
])
def test_os_errors_are_one_line_and_the_traceback_needs_verbose(exc, expected, tmp_path, capsys, monkeypatch):
    assert os_error_message(exc).startswith(expected)

    def failing(*args, **kwargs):
        raise exc

    monkeypatch.setattr("wsss.cli.synth.make_synthetic", failing)
    line = run_main(capsys, "synth", "--out", str(tmp_path / "out"))
    assert line == f"error: {os_error_message(exc)}"
    assert main(["-v", "synth", "--out", str(tmp_path / "out")]) == EX_ERROR
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == line
