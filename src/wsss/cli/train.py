"""``wsss train --config FILE|PRESET [key=value ...] [--resume]``."""

from __future__ import annotations

import argparse
import json
import os

from ..train import Trainer, load_config
from ..train.config import preset_names


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a classifier with one of the methods' objectives")
    p.add_argument("--config", required=True, help=f"a YAML file or a preset name ({', '.join(preset_names())})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run_dir")
    # torchrun passes the local rank in the environment; the older torch.distributed.launch passes this flag.
    p.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    summary = trainer.fit(resume=args.resume)
    if not trainer.dist.is_main:  # one report per job, not per process
        return 0
    print(json.dumps({k: v for k, v in summary.items() if k != "val"}, indent=2))
    if "val" in summary and summary["val"]:
        print(f"val mIoU of the {cfg['val']['method']} maps: {summary['val']['miou']:.4f}")
    return 0
