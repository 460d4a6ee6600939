"""``wsss pseudo``: turn saved localisation maps into pseudo-label PNGs that ``wsss eval`` can score.

For every id of the split, ``MAPS/<id>.npz`` (from ``wsss cam``) and the image are read, optionally
refined, labelled by one rule and written atomically to ``OUT/<id>.png`` (VOC palette). The rule is either
given by its flag or taken with its refinement from a method's pseudo-label recipe (``--method``); the other
flags override single settings. ``OUT/wsss-manifest.json`` records what made the folder (every setting, the maps
folder and what made it, the dataset) and the PNGs written: a rerun with the same settings skips the PNGs it lists,
so an interrupted run resumes where it stopped; other settings are an error unless ``--overwrite``; a PNG it does not
list (a file left in ``--out`` by anything else) is recomputed. With ``--maps``, ``--workers N`` runs N processes
(worth it for the CPU-bound dense CRF). ``--checkpoint RUN`` instead computes the maps on the fly (batched, with
``--workers`` loader processes) and writes no map files. Under ``torchrun`` the ranks share the images out
(:mod:`wsss.cli.sharding`).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..data.io import write_mask
from ..data.manifest import (OutputManifest, check_output_folder, checkpoint_digest, identity_of, pending,
                             untrusted_files)
from ..data.voc import VOCDataset
from ..errors import ConfigError, DataError
from ..methods import REGISTRY, get_method
from ..localize.split import iter_split_maps
from ..models import checkpoint
from ..models.multiview import check_views
from ..pseudo.generate import PseudoSettings, pseudo_label, pseudo_label_for
from ..refine.affinity import NORMALIZATIONS
from ..refine.crf import CRF_PRESETS
from ..refine.refiner import REFINEMENTS
from . import options, sharding

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``pseudo`` subcommand; ``--method`` lists the methods registered now with a recipe."""
    parser = subparsers.add_parser(
        "pseudo",
        help="turn saved maps (<id>.npz) into pseudo-label PNGs",
        description="Label every image of a split from MAPS/<id>.npz with one rule, optionally after a "
        "refinement, and write OUT/<id>.png (VOC palette, 255 = ignore). OUT/wsss-manifest.json records the "
        "settings and the PNGs written: a rerun with the same settings resumes, with other settings it is an error "
        "unless --overwrite. "
        "Give a rule flag, or --method NAME for that method's recipe (rule, parameters and refinement).",
    )
    source = parser.add_argument_group("maps (exactly one)").add_mutually_exclusive_group(required=True)
    source.add_argument("--maps", type=Path, help="folder of <id>.npz maps (wsss cam)")
    source.add_argument("--checkpoint", type=Path,
                        help="compute the maps from this classifier run (folder or model.safetensors) on the fly, "
                        "writing no map files")
    parser.add_argument("--map-method", choices=sorted(REGISTRY.maps()), default=None,
                        help="with --checkpoint: the map formula (default: --method's own map, else getam)")
    parser.add_argument("--data", required=True, type=Path, help="dataset root (VOC layout)")
    parser.add_argument("--split", default=None,
                        help="split name: ROOT/ImageSets/Segmentation/<split>.txt (default: none; a folder of your "
                        "own images takes every labelled image)")
    parser.add_argument("--out", required=True, type=Path, help="folder for the <id>.png labels")
    rule = parser.add_argument_group("rule (exactly one)").add_mutually_exclusive_group(required=True)
    rule.add_argument("--method", choices=sorted(m.name for m in REGISTRY if m.pseudo is not None),
                      help="the pseudo-label recipe of a method (`wsss methods` shows them); the flags below "
                      "override single settings")
    threshold = rule.add_argument("--threshold", dest="bg_threshold", type=options.fraction, metavar="T",
                                  help="rule: constant background score T (as wsss cam --threshold)")
    options.add_deprecated_alias(rule, "--bg-threshold", threshold)
    rule.add_argument(
        "--two-thresholds", type=options.fraction, nargs=2, metavar=("HIGH", "LOW"),
        help="rule (AReAM): labels of the HIGH run, 255 where only the LOW run finds foreground (e.g. 0.55 0.35)",
    )
    rule.add_argument("--psa-alpha", type=options.positive_float, metavar="A", help="rule: PSA background (1 - max)^A (1 or 12)")
    rule.add_argument(
        "--psa-confident", type=options.positive_float, nargs=2, metavar=("LOW", "HIGH"),
        help="rule (PSA, for wsss affinity train): the LOW-alpha run's classes, background where the HIGH-alpha run "
        "finds it, 255 between (AReAM/MCTformer: 1 12; PSA: 4 32); refined with the PSA CRF unless --refine says "
        "otherwise")
    rule.add_argument("--completion", action="store_true", help="rule: GETAM activation-aware label completion")
    parser.add_argument("--refine", choices=REFINEMENTS, default=None,
                        help="refinement before labelling (default: the recipe's, else crf with --psa-confident and "
                        "none otherwise)")
    parser.add_argument("--iterations", type=options.non_negative_int, default=None,
                        help="PAMR / PAR iterations (default: the recipe's, else 10)")
    options.add_crf(parser, CRF_PRESETS, "the recipe's, else psa")
    parser.add_argument(
        "--scale", type=options.positive_fraction, default=None,
        help="resize factor in (0, 1] of the score stack for the refinement (default: the recipe's, else 0.5 "
        "with --two-thresholds and 1 otherwise)",
    )
    parser.add_argument(
        "--softmax", action=argparse.BooleanOptionalAction, default=None,
        help="softmax over background and classes before refining (default: the recipe's, else off; always on "
        "with the two-thresholds rule)",
    )
    parser.add_argument("--saliency", type=Path, default=None,
                        help="completion rule: folder of <id>.png saliency (default: none)")
    parser.add_argument("--cut-threshold", type=options.fraction, default=None,
                        help="completion rule: percentile (default: the recipe's, else 0.9)")
    parser.add_argument(
        "--affinity", type=Path, default=None,
        help="--refine affinity: folder of <id>.npz with 'affinity' (N, N) and 'grid' (h, w) (default: none)",
    )
    parser.add_argument("--affinity-power", type=options.positive_float, default=1.0, help="power beta of the affinity")
    parser.add_argument("--affinity-steps", type=options.non_negative_int, default=1, help="random-walk steps")
    parser.add_argument("--affinity-normalize", choices=NORMALIZATIONS, default="row", help="affinity normalisation")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over: delete the files the manifest of --out lists, even if made with other "
                        "settings")
    options.add_views(parser, squares=True)
    options.add_normalization(parser)
    options.add_batching(parser)
    options.add_limit(parser)
    options.add_device(parser)
    parser.set_defaults(func=run)


def _rule(args: argparse.Namespace) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(rule, its parameters, refinement settings)`` of ``--method``'s recipe or of the rule flag."""
    if args.method is not None:
        recipe = get_method(args.method).pseudo
        return recipe.rule, dict(recipe.params), {"refine": recipe.refine, "iterations": recipe.iterations,
                                                  "crf": recipe.crf, "scale": recipe.scale, "softmax": recipe.softmax}
    if args.bg_threshold is not None:
        rule, params = "threshold", {"bg_threshold": args.bg_threshold}
    elif args.two_thresholds is not None:
        rule, params = "two_thresholds", dict(zip(("high", "low"), args.two_thresholds))
    elif args.psa_alpha is not None:
        rule, params = "psa", {"alpha": args.psa_alpha}
    elif args.psa_confident is not None:
        rule, params = "psa_confident", dict(zip(("low_alpha", "high_alpha"), args.psa_confident))
    else:
        rule, params = "completion", {"cut_threshold": 0.9}
    return rule, params, {"refine": "crf" if rule == "psa_confident" else "none", "iterations": 10, "crf": "psa",
                          "scale": 0.5 if rule == "two_thresholds" else 1.0, "softmax": False}


def settings_from_args(args: argparse.Namespace, num_classes: int, has_background: bool) -> PseudoSettings:
    """The :class:`PseudoSettings` the command line asks for: the rule and its recipe, then the explicit flags."""
    rule, params, refinement = _rule(args)
    refine = options.crf_refinement(args.refine, args.crf_preset)
    for key, flag in (("refine", refine), ("iterations", args.iterations), ("crf", args.crf_preset),
                      ("scale", args.scale), ("softmax", args.softmax)):
        if flag is not None:
            refinement[key] = flag
    if rule == "completion":
        if args.cut_threshold is not None:
            params["cut_threshold"] = args.cut_threshold
        params["saliency_dir"] = args.saliency
    elif args.saliency is not None or args.cut_threshold is not None:
        raise ConfigError(f"--saliency and --cut-threshold are only used with --completion (the rule here: {rule})")
    if rule == "two_thresholds" and params["low"] > params["high"]:
        raise ConfigError(f"--two-thresholds wants HIGH LOW, got {params['high']} {params['low']}")
    if rule == "psa_confident" and params["low_alpha"] > params["high_alpha"]:
        raise ConfigError(f"--psa-confident wants LOW HIGH, got {params['low_alpha']} {params['high_alpha']}")
    if args.affinity is not None and refinement["refine"] != "affinity":
        raise ConfigError("--affinity is only used with --refine affinity")
    if refinement["refine"] == "affinity" and args.affinity is None:
        raise ConfigError(
            "--refine affinity needs --affinity DIR: attention affinities are not stored in the maps files"
        )
    return PseudoSettings(
        maps_dir=args.maps, num_classes=num_classes, has_background=has_background, rule=rule, **params,
        affinity_dir=args.affinity, affinity_power=args.affinity_power, affinity_steps=args.affinity_steps,
        affinity_normalize=args.affinity_normalize, **refinement,
    )


def write_pseudo_label(settings: PseudoSettings, image_id: str, image_path: Path, out_path: Path,
                       palette: np.ndarray | None = None) -> None:
    """Compute one image's pseudo label and write it atomically to ``out_path`` (in ``palette``'s colours)."""
    write_mask(out_path, pseudo_label_for(settings, image_id, image_path), palette)


def _worker_init() -> None:
    torch.set_num_threads(1)  # the pool already keeps every core busy


def _write_in_worker(
    settings: PseudoSettings, image_id: str, image_path: Path, out_path: Path, palette: np.ndarray | None
) -> tuple[str | None, str] | None:
    """:func:`write_pseudo_label`, with a DataError returned as ``(path, problem)`` (it does not pickle)."""
    try:
        write_pseudo_label(settings, image_id, image_path, out_path, palette)
    except DataError as exc:
        return (None if exc.path is None else str(exc.path), exc.problem)
    return None


def _run_pool(settings: PseudoSettings, jobs: Sequence[tuple[str, Path, Path]], palette: np.ndarray | None,
              workers: int, manifest: OutputManifest) -> None:
    context = multiprocessing.get_context("spawn")  # fork after torch threads started can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init) as pool:
        futures = {pool.submit(_write_in_worker, settings, *job, palette): job[0] for job in jobs}
        with tqdm(total=len(futures), desc="pseudo labels", unit="img") as bar:
            for future in as_completed(futures):
                failure = future.result()
                if failure is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise DataError(*failure)
                manifest.record(f"{futures[future]}.png")
                bar.update(1)


def manifest_settings(settings: PseudoSettings, made_by: dict[str, Any] | None) -> dict[str, Any]:
    """The settings that decide the PNGs: every pseudo-label setting, and what made the maps (their folder's
    manifest, None without one; or the checkpoint and map settings), so new maps do not pass for the old ones."""
    return {**settings.describe(), "maps_made_by": made_by}


def _map_source(args: argparse.Namespace, dataset: VOCDataset, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """``(localise, what made the maps)``: a function from image indices to ``(id, maps, labels)``, for
    ``--checkpoint``."""
    source = checkpoint.resolve(args.checkpoint)
    model, spec = checkpoint.load(source, device)
    vit = options.classifier_of(model, spec, source)
    options.check_classes(spec, dataset.classes.names, source, args.data)
    options.check_classifier(vit.num_classes, dataset.classes.num_fg, source, args.data)
    mean, std = options.normalization(args, spec, source)
    method = args.map_method or (args.method and get_method(args.method).own_map) or "getam"
    made_by = {"checkpoint_sha256": checkpoint_digest(source), "method": method,
               "scales": [float(s) for s in args.scales], "flip": bool(args.flip), "mean": list(mean), "std": list(std)}
    if args.square_sizes:  # only when used, so folders written before the option still resume
        made_by["square_sizes"] = list(args.square_sizes)

    def localise(indices: Sequence[int]):
        return iter_split_maps(vit, dataset, method, args.scales, args.flip, mean, std, indices=indices,
                               device=device, batch_size=args.batch_size, square_sizes=args.square_sizes,
                               num_workers=options.loader_workers(args, device))

    return localise, made_by


def run(args: argparse.Namespace) -> int:
    """Write the pseudo labels of every image of the split whose PNG the manifest of ``--out`` does not list."""
    if args.maps is not None and not args.maps.is_dir():
        raise DataError(args.maps, "maps folder not found")
    if args.maps is not None and (args.map_method is not None or args.square_sizes):
        raise ConfigError("--map-method and --square-sizes are used with --checkpoint; the maps of --maps were made "
                          "already")
    check_views(args.scales, args.square_sizes)
    shard = sharding.join(args)
    # A folder of your own images takes its class list from the model it was trained for.
    names = None if args.checkpoint is None else checkpoint.read_spec(checkpoint.resolve(args.checkpoint)).classes
    dataset = VOCDataset(args.data, args.split, require_labels=args.checkpoint is not None, class_names=names)
    settings = settings_from_args(args, dataset.classes.num_classes, dataset.classes.has_background)
    check_output_folder(args.out, dataset.root, dataset.mask_dir,
                        inputs=[(args.maps, "--maps folder"), (args.saliency, "--saliency folder"),
                                (args.affinity, "--affinity folder")])
    localise, made_by = (None, identity_of(args.maps)) if args.checkpoint is None else \
        _map_source(args, dataset, shard.device)
    indices = shard.take(options.limited(range(len(dataset)), args.limit))
    with shard.open_manifest(args.out, "pseudo", manifest_settings(settings, made_by), dataset.root, args.split,
                             overwrite=args.overwrite, command="wsss pseudo", arguments=vars(args)) as manifest:
        # Flushed on the way out, an error included, so the finished PNGs stay listed.
        todo = pending({i: f"{dataset.ids[i]}.png" for i in indices}, args.out, manifest)
        palette = dataset.palette()  # the labels in the dataset's own colours
        if localise is not None:
            index_of = {dataset.ids[i]: i for i in todo}
            for image_id, maps, labels in tqdm(localise(todo), total=len(todo), desc="pseudo labels", unit="img",
                                               disable=not shard.is_main):
                image = dataset.load_image(index_of[image_id])
                write_mask(args.out / f"{image_id}.png", pseudo_label(settings, image_id, image, maps, labels),
                           palette)
                manifest.record(f"{image_id}.png")
        else:
            _from_files(args, settings, dataset, todo, manifest, palette, shard.is_main)
    written, total = shard.finish(args.out, [len(todo), len(indices)])
    if shard.is_main:
        print(f"wrote {written} pseudo labels to {args.out} ({total - written} already there)")
    return 0


def _from_files(args: argparse.Namespace, settings: PseudoSettings, dataset: VOCDataset, todo: Sequence[int],
                manifest: OutputManifest, palette: np.ndarray | None, show: bool) -> None:
    """Label the images ``todo`` from their maps files, in this process or ``--workers`` processes, writing the
    PNGs in ``palette``'s colours."""
    jobs = [(dataset.ids[i], dataset.image_path(dataset.ids[i]), args.out / f"{dataset.ids[i]}.png") for i in todo]
    missing = [image_id for image_id, _, _ in jobs if not settings.maps_path(image_id).is_file()]
    if missing:
        raise DataError(settings.maps_path(missing[0]), f"maps file not found ({len(missing)} of {len(jobs)} missing)")
    maps_manifest, unlisted = untrusted_files(settings.maps_dir, [f"{image_id}.npz" for image_id, _, _ in jobs])
    if unlisted:
        log.warning("%d maps files in %s are not listed in its manifest, or changed since (%s, ...): they were not "
                    "written by the `%s` run it records", len(unlisted), settings.maps_dir, unlisted[0],
                    maps_manifest.get("command"))
    workers = args.workers or 0
    if workers > 0 and len(jobs) > 1:
        _run_pool(settings, jobs, palette, workers, manifest)
    else:
        for job in tqdm(jobs, desc="pseudo labels", unit="img", disable=not show):
            write_pseudo_label(settings, *job, palette)
            manifest.record(f"{job[0]}.png")
