"""``wsss train --config FILE|PRESET [key=value ...] [--resume [--allow-changes]] [--print-config]``."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import ConfigError
from ..train import Trainer
from ..train.config import dump_config, load_config, preset_names
from . import options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``train`` subcommand."""
    p = subparsers.add_parser(
        "train", help="train a model with one of the methods' objectives",
        description="Train with a config: the defaults, then the YAML file or preset, then each key=value override "
        "in order. Every key is typed and checked before anything is built (--print-config shows them all).")
    p.add_argument("--config", required=True, help=f"a YAML file or a preset name ({', '.join(preset_names())})")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides (YAML values), e.g. optim.lr=1e-4 val.scales=[1,0.5]")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run_dir")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue although settings that change what is learnt differ from the "
                   "checkpoint's (recorded in train.log; changed optim settings start a fresh optimiser state)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config with every key (YAML that --config reads back) and exit")
    # torchrun passes the local rank in the environment; the older torch.distributed.launch passes this flag.
    p.add_argument("--local-rank", "--local_rank", dest="local_rank", type=options.non_negative_int,
                   default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate the config, then train (or only print the config)."""
    if args.allow_changes and not args.resume:
        raise ConfigError("--allow-changes applies to a resumed run: give it with --resume")
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    trainer = Trainer(cfg)
    summary = trainer.fit(resume=args.resume, allow_changes=args.allow_changes)
    if not trainer.dist.is_main:  # one report per job, not per process
        return 0
    print(json.dumps({k: v for k, v in summary.items() if k != "val"}, indent=2))
    if "val" in summary and summary["val"]:
        print(f"val mIoU of the {cfg['val']['method']} maps: {summary['val']['miou']:.4f}")
    return 0
