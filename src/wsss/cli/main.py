"""The ``wsss`` command: one subcommand per step of the pipeline.

The subcommands are listed in :data:`COMMANDS` with their one-line help, so ``wsss --help`` and ``wsss --version``
import none of them (nor torch); only the chosen command's module is imported, to build its parser and run it.

Every failure a user can cause leaves through one path: a :class:`~wsss.errors.WSSSError` (bad data, checkpoint or
config) or an ``OSError`` on a file (disk full, permission denied, not found) is reported as one ``error: ...`` line
on stderr (a config with several bad keys: one line per key), naming the file or setting, with exit status 2; the
traceback is shown only with ``wsss -v``. A usage error (unknown option, bad option value) prints the usage and
``error: ...``, with exit status 64.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
import traceback
from typing import NoReturn, Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from .. import __version__
from ..errors import ConfigError, WSSSError

EX_USAGE = 64  # sysexits.h: the command was used incorrectly
EX_ERROR = 2  # a WSSSError: bad data, checkpoint or config

# (command, module under wsss.cli, one-line help), in the order of the data flow. Each module has
# add_parser(subparsers), which registers the command under the same name and help, and run(args).
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("synth", "synth", "generate a synthetic segmentation dataset with exact masks"),
    ("prepare", "prepare", "build VOC+SBD train_aug or COCO VOC-style masks"),
    ("check-data", "check_data", "check a VOC-layout dataset split; exit 1 on problems"),
    ("train", "train", "train a model with one of the methods' objectives"),
    ("entropy", "entropy", "per-block attention entropies (AReAM's entropy layer weights)"),
    ("cam", "cam", "write localisation maps (.npz) for a split, and label PNGs"),
    ("maps", "maps", "localisation maps, heat-map pictures and labels for any images (files or folders)"),
    ("pseudo", "pseudo", "turn saved maps (<id>.npz) into pseudo-label PNGs"),
    ("affinity", "affinity", "PSA's mask step: train AffinityNet on confident labels, random-walk the seeds"),
    ("predict", "predict", "segment a split with a trained segmentation model and write label PNGs"),
    ("eval", "eval", "score predictions (label PNGs or .npz maps) against a split's ground truth"),
    ("methods", "methods", "list the registered methods: maps, options, presets, pseudo-label recipes"),
    ("upgrade-checkpoint", "upgrade_checkpoint", "rewrite an older checkpoint with its input normalisation"),
    ("import-checkpoint", "import_checkpoint", "convert an authors' released model into a wsss checkpoint"),
    ("demo", "demo", "synthetic data -> baseline, ACR, AReAM, GETAM -> maps, pseudo labels, segmentation -> report"),
)

EPILOG = f"""\
exit status:
  0    success
  1    check-data found problems in the dataset
  {EX_ERROR}    an error in the inputs (a missing or inconsistent file, a bad checkpoint or config value);
       one line "error: ..." on stderr says which
  {EX_USAGE}   a usage error: unknown command or option, bad option value (the usage is printed)
  130  interrupted

Run "wsss COMMAND --help" for the options of a command."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default, unless it is a flag, required, or None (whose meaning the help text says), or the
    help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.nargs == 0 or action.required or action.default is None
                or action.default is argparse.SUPPRESS or "default" in text):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that shows defaults and exits with :data:`EX_USAGE` on a usage error."""

    def __init__(self, *args, formatter_class: type[argparse.HelpFormatter] = HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"error: {message} (see {self.prog} --help)\n")


class _MainHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The exit-status table of ``wsss --help`` as written."""


def _chosen(argv: Sequence[str]) -> str | None:
    """The command named on the command line (the first word that is not a top-level option), or None."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``wsss`` parser; of the subcommands only the one named in ``argv`` is imported and fully built."""
    parser = Parser(prog="wsss", description="Weakly supervised semantic segmentation toolkit", epilog=EPILOG,
                    formatter_class=_MainHelpFormatter)
    parser.add_argument("--version", action="version", version=f"wsss {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv)
    for name, module, help_text in COMMANDS:
        if name == chosen:
            importlib.import_module(f"wsss.cli.{module}").add_parser(sub)
        else:  # listed in wsss --help without importing its module
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


# What to do about an OSError, by errno; the file comes from the error itself.
_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device; free some space or write to another disk",
    errno.EDQUOT: "disk quota exceeded; free some space or write to another disk",
    errno.EFBIG: "file too large for this file system or limit; write to another disk",
    errno.EACCES: "permission denied; check the permissions or choose another path",
    errno.EPERM: "operation not permitted; check the permissions or choose another path",
    errno.EROFS: "read-only file system; choose another path",
    errno.ENOENT: "no such file or directory; check the path",
    errno.ENOTDIR: "a part of the path is not a folder; check the path",
    errno.EISDIR: "is a folder, not a file; check the path",
    errno.EEXIST: "already exists; remove it or choose another path",
    errno.ENOTEMPTY: "folder not empty; remove it or choose another path",
    errno.EMFILE: "too many open files; lower the number of workers or raise the limit (ulimit -n)",
}


def os_error_message(exc: OSError) -> str:
    """One line for an ``OSError``: the file(s) it names, what went wrong and what to do."""
    advice = _OS_ADVICE.get(exc.errno) or exc.strerror or str(exc)
    files = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    return f"{' -> '.join(files)}: {advice}" if files else advice


def report(message: str, verbose: bool, per_line: bool = False) -> int:
    """Print ``message`` as one ``error: ...`` line on stderr (one per line of it with ``per_line``: a config's
    problems), the traceback first with ``verbose``; return 2."""
    if verbose:
        traceback.print_exc()
    lines = [line.strip() for line in message.splitlines() if line.strip()] or ["(no message)"]
    for line in lines if per_line else [" ".join(lines)]:
        print(f"error: {line}", file=sys.stderr)
    return EX_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``wsss`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status: 2 with one ``error: ...``
    line per problem for a :class:`~wsss.errors.WSSSError` or an ``OSError`` (the traceback only with ``-v``). As
    with any argparse program, ``--help`` and ``--version`` leave through ``SystemExit(0)`` and a usage error
    through ``SystemExit(EX_USAGE)``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    try:
        args = build_parser(argv).parse_args(argv)
        verbose = args.verbose
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
        # Log lines go through tqdm.write: printed above a progress bar instead of into it.
        with logging_redirect_tqdm():
            return int(args.func(args) or 0)
    except WSSSError as exc:
        return report(str(exc), verbose, per_line=isinstance(exc, ConfigError))
    except OSError as exc:
        return report(os_error_message(exc), verbose)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
