"""``wsss affinity train|walk``: PSA's mask step (AffinityNet, then its random walk over the seeds).

1. ``wsss pseudo --maps SEEDS --psa-confident 1 12 --out CONF ...``: confident labels (PSA's CRF at two alphas).
2. ``wsss affinity train --config affinity_voc data.root=ROOT data.mask_dir=CONF ...``: ``wsss train`` with the
   ``affinity`` objective (the same config, run folder, resume and progress machinery; any other method is an
   error here).
3. ``wsss affinity walk --checkpoint RUN --maps SEEDS --data ROOT --split S --out MASKS``: each image's seeds
   random-walked with the network's affinities, written as label PNGs; ``OUT/wsss-manifest.json`` makes a rerun
   resume, as ``wsss pseudo`` does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data.manifest import check_output_folder, checkpoint_digest, identity_of
from ..data.voc import VOCDataset
from ..errors import CheckpointError, ConfigError, DataError
from ..models import checkpoint
from ..pseudo.random_walk import walk_settings_of, walk_split
from ..refine.affinity import PSA_BACKGROUND, PSA_BETA, PSA_LOGT
from ..train.config import load_config
from . import options, sharding
from . import train as train_command


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``affinity`` with its ``train`` and ``walk`` subcommands."""
    parser = subparsers.add_parser(
        "affinity", help="PSA's mask step: train AffinityNet on confident labels, random-walk the seeds",
        description="PSA's mask step in three commands: confident labels (wsss pseudo --psa-confident 1 12), "
        "AffinityNet trained on their pair labels (wsss affinity train), and the seeds random-walked with its "
        "affinities (wsss affinity walk).")
    steps = parser.add_subparsers(dest="affinity_command", required=True, metavar="{train,walk}",
                                  parser_class=type(parser))
    train = steps.add_parser("train", help="train AffinityNet (wsss train with the affinity objective)",
                             description="wsss train for the affinity objective: the defaults, the YAML file or "
                             "preset, then each key=value override.")
    train.add_argument("--config", required=True, help="a YAML file or preset (affinity_voc, affinity_msrc, ...)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.mask_dir=DIR")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run_dir")
    train.add_argument("--allow-changes", action="store_true", help="as wsss train --allow-changes")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("--local-rank", "--local_rank", dest="local_rank", type=options.non_negative_int,
                       default=None, help=argparse.SUPPRESS)
    train.set_defaults(func=run_train)

    walk = steps.add_parser(
        "walk", help="random-walk saved maps with a trained AffinityNet into label PNGs",
        description="Write OUT/<id>.png for every image of the split: its MAPS/<id>.npz seeds behind a constant "
        "background score, walked with the AffinityNet's affinity^beta for 2^logt steps (PSA's infer_aff.py). "
        "OUT/wsss-manifest.json records the settings: a rerun with the same settings resumes.")
    walk.add_argument("--checkpoint", required=True, type=Path, help="the AffinityNet run (folder or model.safetensors)")
    walk.add_argument("--maps", required=True, type=Path, help="folder of <id>.npz seeds (wsss cam)")
    walk.add_argument("--data", required=True, type=Path, help="dataset root (VOC layout)")
    walk.add_argument("--split", default=None, help="split name: ROOT/ImageSets/Segmentation/<split>.txt (default: "
                      "none; a folder of your own images takes every labelled image)")
    walk.add_argument("--out", required=True, type=Path, help="folder for the <id>.png labels")
    walk.add_argument("--threshold", type=options.fraction, default=PSA_BACKGROUND,
                      help="constant background score in front of the maps (AReAM's bg_thr)")
    walk.add_argument("--beta", type=options.positive_float, default=None,
                      help=f"power of the affinity (default: the run's method.walk_beta; PSA's {PSA_BETA:g})")
    walk.add_argument("--logt", type=options.non_negative_int, default=None,
                      help=f"2^logt random-walk steps (default: the run's method.walk_log_steps; PSA's {PSA_LOGT})")
    walk.add_argument("--overwrite", action="store_true",
                      help="start over: delete the files the manifest of --out lists, even if made with other settings")
    options.add_normalization(walk)
    options.add_limit(walk)
    options.add_device(walk)
    walk.set_defaults(func=run_walk)


def run_train(args: argparse.Namespace) -> int:
    """``wsss train`` after checking the config trains the affinity objective."""
    name = load_config(args.config, args.overrides)["method"]["name"]
    if name != "affinity":
        raise ConfigError(f"wsss affinity train trains the affinity objective; {args.config} has method.name "
                          f"{name!r} (use wsss train for it)")
    return train_command.run(args)


def run_walk(args: argparse.Namespace) -> int:
    """Walk every image of the split whose PNG the manifest of ``--out`` does not list."""
    if not args.maps.is_dir():
        raise DataError(args.maps, "maps folder not found")
    shard = sharding.join(args)
    source = checkpoint.resolve(args.checkpoint)
    model, spec = checkpoint.load(source, shard.device)
    if not hasattr(model, "dense_affinity"):
        raise CheckpointError(f"{source} is not an AffinityNet (train one with `wsss affinity train`)")
    dataset = VOCDataset(args.data, args.split, require_labels=False, class_names=spec.classes)
    options.check_classes(spec, dataset.classes.names, source, args.data)
    mean, std = options.normalization(args, spec, source)
    check_output_folder(args.out, dataset.root, dataset.mask_dir, inputs=[(args.maps, "--maps folder")])
    settings = walk_settings_of(spec.config, args.threshold, args.beta, args.logt)
    made_by = {**settings.describe(), "checkpoint_sha256": checkpoint_digest(source), "mean": list(mean),
               "std": list(std), "maps_made_by": identity_of(args.maps)}
    indices = shard.take(options.limited(range(len(dataset)), args.limit))
    with shard.open_manifest(args.out, "random_walk", made_by, dataset.root, args.split, overwrite=args.overwrite,
                             command="wsss affinity walk", arguments=vars(args)) as manifest:
        written, skipped = walk_split(model, dataset, args.maps, args.out, settings, mean, std, shard.device,
                                      indices, manifest, progress=shard.is_main)
    written, skipped = shard.finish(args.out, [written, skipped])
    if shard.is_main:
        print(f"wrote {written} random-walk labels to {args.out} ({skipped} already there)")
    return 0
