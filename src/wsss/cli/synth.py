"""``wsss synth``: write the synthetic shapes dataset (VOC layout) for demos and tests.

``--out`` must be a new or empty folder, or one that already holds a synthetic set made with the same settings
(rewritten identically: the generator is deterministic) or an interrupted one; any other folder is refused, so that a
real dataset's ``classes.txt`` and split lists are never replaced.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from ..data.synth import MAX_CLASSES, make_synthetic
from ..errors import ConfigError
from . import options

SYNTH_FILE = "synth.json"  # what make_synthetic writes, with its settings, beside classes.txt
# The names an interrupted run of the generator leaves (its images and masks come before any list).
_PARTIAL = re.compile(r"\.?(train|val)_\d{5}\.(jpg|png)(\..*\.tmp)?")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``synth`` subcommand."""
    parser = subparsers.add_parser(
        "synth",
        help="generate a synthetic segmentation dataset with exact masks",
        description="Write a synthetic VOC-layout dataset: textured shapes on cluttered scenes, with masks. OUT must "
        "be new, empty, or a synthetic set made with the same settings.",
    )
    parser.add_argument("--out", required=True, help="output dataset folder")
    parser.add_argument("--num-train", type=options.non_negative_int, default=600, help="training images")
    parser.add_argument("--num-val", type=options.non_negative_int, default=100, help="validation images")
    parser.add_argument("--size", type=options.bounded_int(16), default=96, help="image side in pixels, >= 16")
    # Checked by make_synthetic (a ConfigError naming num_classes), which tests/test_synth.py relies on.
    parser.add_argument("--classes", type=int, default=4, help=f"object classes, 1..{MAX_CLASSES}")
    parser.add_argument("--seed", type=options.non_negative_int, default=0, help="random seed")
    parser.add_argument("--bias", type=options.fraction, default=0.8,
                        help="how often a class sits on its preferred scene, in [0, 1]")
    parser.add_argument("--max-objects", type=options.positive_int, default=3, help="objects per image, at most")
    parser.add_argument("--png", action="store_true", help="write PNG images instead of JPEG (quality 95)")
    parser.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a synthetic set records (in ``synth.json``, or by its files), as the flags give them."""
    return {"seed": args.seed, "size": args.size, "num_classes": args.classes, "bias": args.bias,
            "max_objects": args.max_objects, "num_train": args.num_train, "num_val": args.num_val,
            "format": "png" if args.png else "jpg", "parts": 0.0, "plain": 0.0}


def _recorded(out: Path) -> dict[str, Any]:
    """The settings of the synthetic set in ``out``, read back from its ``synth.json`` and images."""
    path = out / SYNTH_FILE
    try:
        meta = json.loads(path.read_text())
        images = meta["images"]
        recorded = {key: meta[key] for key in ("seed", "size", "num_classes", "bias", "max_objects")}
        # The shared-parts and plain-background options (off from this command) came later: absent means off.
        recorded.update(parts=meta.get("parts", 0.0), plain=meta.get("plain", 0.0))
        splits = [info["split"] for info in images.values()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{path}: not a readable synthetic-set record ({exc}); --out {out} must be a new or empty "
                          f"folder, or a synthetic set") from None
    formats = sorted({p.suffix[1:] for p in (out / "JPEGImages").glob("*_*.*") if not p.name.startswith(".")})
    return {**recorded, "num_train": splits.count("train"), "num_val": splits.count("val"),
            "format": formats[0] if len(formats) == 1 else "/".join(formats) or None}


def _interrupted(out: Path) -> bool:
    """Whether ``out`` holds only what a killed generator leaves: JPEGImages/ and SegmentationClass/ with its ids."""
    entries = list(out.iterdir())
    if not all(e.is_dir() and not e.is_symlink() and e.name in ("JPEGImages", "SegmentationClass") for e in entries):
        return False
    return all(_PARTIAL.fullmatch(f.name) and f.is_file() and not f.is_symlink()
               for e in entries for f in e.iterdir())


def check_out(out: Path, settings: dict[str, Any]) -> None:
    """Refuse an ``--out`` whose content generating would replace: a file, a folder that is not a synthetic set,
    or a synthetic set with other settings (the ConfigError names the differences)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder; choose a new folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / SYNTH_FILE).is_file():
        if _interrupted(out):
            return
        raise ConfigError(f"--out {out}: a folder that is neither empty nor a synthetic set (no {SYNTH_FILE}); "
                          f"writing would replace its classes.txt and split lists: choose a new or empty folder")
    recorded = _recorded(out)
    differ = [f"{key} {recorded.get(key)!r} (asked {value!r})" for key, value in settings.items()
              if recorded.get(key) != value]
    if differ:
        raise ConfigError(f"--out {out}: holds a synthetic set made with other settings: {', '.join(differ)}; choose "
                          f"a new folder, or delete this one to replace it")


def run(args: argparse.Namespace) -> int:
    """Generate the dataset and print where it went."""
    out = Path(args.out)
    check_out(out, _settings(args))
    out = make_synthetic(
        out,
        num_train=args.num_train,
        num_val=args.num_val,
        size=args.size,
        num_classes=args.classes,
        seed=args.seed,
        bias=args.bias,
        max_objects=args.max_objects,
        image_format="png" if args.png else "jpg",
        progress=True,
    )
    print(f"wrote {args.num_train} train and {args.num_val} val images with {args.classes} classes to {out}")
    return 0
