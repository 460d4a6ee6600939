"""``wsss pseudo``: turn saved localisation maps into pseudo-label PNGs that ``wsss eval`` can score.

For every id of the split, ``MAPS/<id>.npz`` (from ``wsss localize``) and the image are read, optionally
refined, labelled by one rule and written atomically to ``OUT/<id>.png`` (VOC palette). Images whose
PNG already exists are skipped, so an interrupted run resumes where it stopped. ``--workers N`` runs N
processes (worth it for the CPU-bound dense CRF).
"""

from __future__ import annotations

import argparse
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from ..data.io import write_mask
from ..data.voc import VOCDataset
from ..errors import ConfigError, DataError
from ..pseudo.generate import PseudoSettings, pseudo_label_for
from ..refine.affinity import NORMALIZATIONS
from ..refine.crf import CRF_PRESETS
from ..refine.refiner import REFINEMENTS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``pseudo`` subcommand."""
    parser = subparsers.add_parser(
        "pseudo",
        help="turn saved maps (<id>.npz) into pseudo-label PNGs",
        description="Label every image of a split from MAPS/<id>.npz with one rule, optionally after a "
        "refinement, and write OUT/<id>.png (VOC palette, 255 = ignore). Existing PNGs are kept (resume).",
    )
    parser.add_argument("--maps", required=True, type=Path, help="folder of <id>.npz maps (wsss localize)")
    parser.add_argument("--data", required=True, type=Path, help="dataset root (VOC layout)")
    parser.add_argument("--split", required=True, help="split name: ROOT/ImageSets/Segmentation/<split>.txt")
    parser.add_argument("--out", required=True, type=Path, help="folder for the <id>.png labels")
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument("--bg-threshold", type=float, metavar="T", help="constant background score T")
    rule.add_argument(
        "--two-thresholds", type=float, nargs=2, metavar=("HIGH", "LOW"),
        help="AReAM: labels of the HIGH run, 255 where only the LOW run finds foreground (e.g. 0.55 0.35)",
    )
    rule.add_argument("--psa-alpha", type=float, metavar="A", help="PSA background (1 - max)^A (1 or 12)")
    rule.add_argument("--completion", action="store_true", help="GETAM activation-aware label completion")
    parser.add_argument("--refine", choices=REFINEMENTS, default="none", help="refinement before labelling")
    parser.add_argument("--iterations", type=int, default=10, help="PAMR / PAR iterations (default 10)")
    parser.add_argument("--crf-preset", choices=sorted(CRF_PRESETS), default="psa", help="dense CRF parameters")
    parser.add_argument(
        "--scale", type=float, default=None,
        help="resize factor of the score stack for the refinement (default 0.5 with --two-thresholds, else 1)",
    )
    parser.add_argument(
        "--softmax", action="store_true",
        help="softmax over background and classes before refining (always on with --two-thresholds)",
    )
    parser.add_argument("--saliency", type=Path, default=None, help="--completion: folder of <id>.png saliency")
    parser.add_argument("--cut-threshold", type=float, default=0.9, help="--completion percentile (default 0.9)")
    parser.add_argument(
        "--affinity", type=Path, default=None,
        help="--refine affinity: folder of <id>.npz with 'affinity' (N, N) and 'grid' (h, w)",
    )
    parser.add_argument("--affinity-power", type=float, default=1.0, help="power beta of the affinity")
    parser.add_argument("--affinity-steps", type=int, default=1, help="random-walk steps")
    parser.add_argument("--affinity-normalize", choices=NORMALIZATIONS, default="row", help="affinity normalisation")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (0: work in this process)")
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace, num_classes: int, has_background: bool) -> PseudoSettings:
    """The :class:`PseudoSettings` the command line asks for."""
    if args.iterations < 0:
        raise ConfigError(f"--iterations must be >= 0, got {args.iterations}")
    if args.saliency is not None and not args.completion:
        raise ConfigError("--saliency is only used with --completion")
    if args.affinity is not None and args.refine != "affinity":
        raise ConfigError("--affinity is only used with --refine affinity")
    if args.refine == "affinity" and args.affinity is None:
        raise ConfigError(
            "--refine affinity needs --affinity DIR: attention affinities are not stored in the maps files"
        )
    if args.bg_threshold is not None:
        rule, extra = "threshold", {"bg_threshold": args.bg_threshold}
    elif args.two_thresholds is not None:
        high, low = args.two_thresholds
        if low > high:
            raise ConfigError(f"--two-thresholds wants HIGH LOW, got {high} {low}")
        rule, extra = "two_thresholds", {"high": high, "low": low}
    elif args.psa_alpha is not None:
        rule, extra = "psa", {"alpha": args.psa_alpha}
    else:
        rule, extra = "completion", {"cut_threshold": args.cut_threshold, "saliency_dir": args.saliency}
    scale = args.scale if args.scale is not None else (0.5 if rule == "two_thresholds" else 1.0)
    return PseudoSettings(
        maps_dir=args.maps, num_classes=num_classes, has_background=has_background, rule=rule,
        refine=args.refine, iterations=args.iterations, crf=args.crf_preset, affinity_dir=args.affinity,
        affinity_power=args.affinity_power, affinity_steps=args.affinity_steps,
        affinity_normalize=args.affinity_normalize, scale=scale, softmax=args.softmax, **extra,
    )


def write_pseudo_label(settings: PseudoSettings, image_id: str, image_path: Path, out_path: Path) -> None:
    """Compute one image's pseudo label and write it atomically to ``out_path``."""
    write_mask(out_path, pseudo_label_for(settings, image_id, image_path))


def _worker_init() -> None:
    torch.set_num_threads(1)  # the pool already keeps every core busy


def _write_in_worker(
    settings: PseudoSettings, image_id: str, image_path: Path, out_path: Path
) -> tuple[str | None, str] | None:
    """:func:`write_pseudo_label`, with a DataError returned as ``(path, problem)`` (it does not pickle)."""
    try:
        write_pseudo_label(settings, image_id, image_path, out_path)
    except DataError as exc:
        return (None if exc.path is None else str(exc.path), exc.problem)
    return None


def _run_pool(settings: PseudoSettings, jobs: Sequence[tuple[str, Path, Path]], workers: int) -> None:
    context = multiprocessing.get_context("spawn")  # fork after torch threads started can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init) as pool:
        futures = [pool.submit(_write_in_worker, settings, *job) for job in jobs]
        with tqdm(total=len(futures), desc="pseudo labels", unit="img") as bar:
            for future in as_completed(futures):
                failure = future.result()
                if failure is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise DataError(*failure)
                bar.update(1)


def run(args: argparse.Namespace) -> int:
    """Write the pseudo labels of every image of the split that has none yet."""
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    if not args.maps.is_dir():
        raise DataError(args.maps, "maps folder not found")
    dataset = VOCDataset(args.data, args.split, require_labels=False)
    settings = settings_from_args(args, dataset.classes.num_classes, dataset.classes.has_background)
    jobs = [
        (image_id, dataset.image_path(image_id), args.out / f"{image_id}.png")
        for image_id in dataset.ids
        if not (args.out / f"{image_id}.png").is_file()
    ]
    missing = [image_id for image_id, _, _ in jobs if not settings.maps_path(image_id).is_file()]
    if missing:
        raise DataError(settings.maps_path(missing[0]), f"maps file not found ({len(missing)} of {len(jobs)} missing)")
    skipped = len(dataset.ids) - len(jobs)
    if args.workers > 0 and len(jobs) > 1:
        _run_pool(settings, jobs, args.workers)
    else:
        for job in tqdm(jobs, desc="pseudo labels", unit="img"):
            write_pseudo_label(settings, *job)
    print(f"wrote {len(jobs)} pseudo labels to {args.out} ({skipped} already there)")
    return 0
