"""Every ``wsss`` command the README (and the demo report) shows is one the real command line takes.

A command line of a ``bash`` block (``wsss ...`` or ``torchrun ... -m wsss.cli.main ...``) must parse with the real
parser, spell every option in full (argparse would also take an abbreviation) and, for ``wsss train``, name a
preset and config keys that exist. A ``wsss ...`` span in the text is a synopsis (``[--split S]``, ``voc|coco``):
its command and every option it names must exist. ``tests/test_readme.py`` runs the Python snippet.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from wsss.cli.demo import NEXT_STEPS
from wsss.cli.main import COMMANDS, build_parser
from wsss.errors import ConfigError
from wsss.train.config import load_config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
MODULE = "wsss.cli.main"


def _argv(line: str) -> list[str] | None:
    """The arguments after ``wsss`` (or ``-m wsss.cli.main``) of a shell line, comments dropped; None for a line
    that runs no wsss command."""
    words = shlex.split(line, comments=True)
    if words[:1] == ["wsss"]:
        return words[1:]
    if MODULE in words and words[words.index(MODULE) - 1] == "-m":
        return words[words.index(MODULE) + 1:]
    return None


def block_commands(text: str) -> list[str]:
    """The command lines of the ``bash`` blocks of ``text`` that run wsss."""
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    return [line for line in lines if line.strip() and _argv(line) is not None]


def synopses(text: str) -> list[str]:
    """The ``wsss ...`` code spans of the prose (outside code blocks)."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`(wsss [^`]+)`", prose)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command(words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The (nested) parser the leading words name, and the words after them; an unknown command fails."""
    assert words and words[0] in {name for name, _, _ in COMMANDS}, f"no command {words[:1]}"
    parser = _subparsers(build_parser(words[:1]))[words[0]]
    rest = words[1:]
    while _subparsers(parser) and rest and not rest[0].startswith("-"):
        choices = _subparsers(parser)
        assert rest[0] in choices, f"{parser.prog} has no sub-command {rest[0]!r} ({sorted(choices)})"
        parser, rest = choices[rest[0]], rest[1:]
    return parser, rest


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def _check_options(parser: argparse.ArgumentParser, words: list[str]) -> None:
    known = _options(parser)
    for word in words:
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            assert flag in known, f"{parser.prog} has no option {flag} (it has {sorted(known)})"


def check_command_line(line: str) -> argparse.Namespace:
    """Parse ``line`` with the real parser, check its options are spelt in full, and, for ``train``, its config."""
    argv = _argv(line)
    parser, rest = _command(argv)
    _check_options(parser, rest)
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"`{line}` does not parse (exit {exc.code})")
    if argv[0] == "train":  # the preset exists and every key=value is a config key of the right type
        load_config(args.config, args.overrides)
    return args


def test_the_readme_shows_commands():
    lines = block_commands(README)
    assert len(lines) >= 8 and any(line.startswith("torchrun") for line in lines)
    assert {_argv(line)[0] for line in lines} >= {"train", "cam", "check-data", "pseudo"}
    assert len(synopses(README)) >= 20


@pytest.mark.parametrize("line", block_commands(README))
def test_every_readme_command_line_parses(line):
    check_command_line(line)


@pytest.mark.parametrize("line", [line for line in NEXT_STEPS if _argv(line) is not None])
def test_every_command_of_the_demo_report_parses(line):
    check_command_line(line)


@pytest.mark.parametrize("span", synopses(README))
def test_every_command_the_readme_text_names_exists_with_its_options(span):
    words = span.replace("\\|", "|").split()[1:]
    first, rest = words[0], words[1:]
    assert first in {name for name, _, _ in COMMANDS}, f"`{span}`: no command {first!r}"
    parser = _subparsers(build_parser([first]))[first]
    nested = _subparsers(parser)
    parsers = [parser]
    if nested and rest and not rest[0].startswith(("-", "[")):  # `wsss prepare voc|coco`
        names, rest = rest[0].split("|"), rest[1:]
        assert set(names) <= set(nested), f"`{span}`: {parser.prog} has {sorted(nested)}"
        parsers = [nested[name] for name in names]
    flags = [word.strip("[]") for word in rest if word.strip("[]").startswith("--")]
    for p in parsers:
        _check_options(p, flags)


@pytest.mark.parametrize("bad, error", [
    ("wsss cam --checkpoint R --data D --out O --thresh 0.3", AssertionError),  # argparse takes the abbreviation
    ("wsss pseudo --maps M --data D --out O --bg_threshold 0.3", AssertionError),
    ("wsss cam --checkpoint R --data D --out O --threshold 3", pytest.fail.Exception),  # not in [0, 1]
    ("wsss train --config baseline_demo optim.learning_rate=1", ConfigError),
    ("wsss localize --checkpoint R", AssertionError),
])
def test_the_checks_catch_a_wrong_command(bad, error):
    with pytest.raises(error):
        check_command_line(bad)


@pytest.mark.parametrize("span", ["wsss cam [--splits S]", "wsss prepare voc|lvis", "wsss localise"])
def test_the_checks_catch_a_wrong_synopsis(span):
    with pytest.raises(AssertionError):
        test_every_command_the_readme_text_names_exists_with_its_options(span)
