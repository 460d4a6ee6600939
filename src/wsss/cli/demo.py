"""``wsss demo``: the whole WSSS pipeline on a synthetic set, with nothing to download.

1. make a synthetic dataset whose objects have a shared part (partial activation), whose classes prefer a context
   (co-occurrence) and some of whose backgrounds are plain fields (over-smoothing);
2. run :func:`wsss.pipeline.run_pipeline` on it with the ``*_demo`` presets: the baseline trains from scratch on the
   image labels and each paper method (ACR, AReAM, GETAM) continues from its classifier; every map formula is scored
   on every model, each method makes pseudo labels with its own refinement, and one segmentation model is trained
   on the best pseudo labels;
3. write ``results.json`` and ``report.md`` (tables, pictures with titles and a colour legend, next steps).

Finished stages are kept, so an interrupted demo resumes; a demo folder made with other settings is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.io import write_bytes_atomic
from ..data.synth import make_synthetic
from ..data.voc import VOCDataset
from ..errors import ConfigError
from ..methods import get_method
from ..models import checkpoint
from ..pipeline import PipelineSettings, classifier_of, results_table, run_pipeline
from ..settings import changed_settings, describe_changes
from ..train.validate import labels_grid, map_grid
from ..visualize import save_picture
from . import options

SYNTH = {"size": 64, "num_train": 320, "num_val": 60, "num_classes": 4, "seed": 0, "bias": 0.8, "parts": 0.4,
         "plain": 0.3}
METHODS = ("baseline", "acr", "aream", "getam")  # the baseline first: the others continue from it
PICTURE_IMAGES = 3
TILE = 192
# The report's last section: the same steps on the user's data (tests/test_readme_commands.py parses each).
NEXT_STEPS = (
    "wsss check-data --data ROOT --split train       # a VOC-layout folder: JPEGImages, SegmentationClass or labels, "
    "ImageSets/Segmentation, classes.txt",
    "wsss train --config acr_msrc data.root=ROOT run_dir=runs/acr model.weights=VIT.safetensors",
    "wsss cam --checkpoint runs/acr --data ROOT --split train --method acr --out runs/acr/maps",
    "wsss pseudo --method acr --maps runs/acr/maps --data ROOT --split train --out runs/acr/pseudo"
    "   # its own rule and refinement",
    "wsss eval --data ROOT --split train --pred runs/acr/pseudo      # when ROOT has some true masks",
    "wsss train --config segment_msrc data.root=ROOT data.mask_dir=runs/acr/pseudo run_dir=runs/seg",
    "wsss predict --checkpoint runs/seg --data ROOT --split val --out runs/seg/pred --show",
    "python benchmarks/pipeline.py --data ROOT --recipe msrc --out pipeline.json   # all of it, every method",
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``demo`` subcommand."""
    p = subparsers.add_parser(
        "demo", help="synthetic data -> baseline, ACR, AReAM, GETAM -> maps, pseudo labels, segmentation -> report",
        description="Make a synthetic dataset, train the baseline and the three paper methods on its image labels, "
        "score every map formula on every model, make pseudo labels with each method's own refinement, train one "
        "segmentation model on the best of them and write OUT/report.md and OUT/results.json. Finished steps are "
        "skipped (resume).")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--steps", type=options.positive_int, default=None,
                   help="training steps of every run (default: the *_demo presets'; a small number to try it out)")
    p.add_argument("--threads", type=options.positive_int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--num-train", type=options.positive_int, default=SYNTH["num_train"],
                   help="synthetic training images")
    p.add_argument("--num-val", type=options.positive_int, default=SYNTH["num_val"],
                   help="synthetic validation images")
    p.add_argument("--supervised", action="store_true",
                   help="also train the segmentation model on the true masks (the upper bound; about a minute)")
    options.add_device(p)
    p.set_defaults(func=run)


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Record the demo's settings in ``OUT/demo.json``; a folder made with other settings is refused."""
    path = out / "demo.json"
    if path.is_file():
        changes = changed_settings(json.loads(path.read_text()), settings)
        if changes:
            raise ConfigError(f"{out} holds a demo made with other settings ({describe_changes(changes)}); "
                              "give another --out or delete the folder")
    else:
        write_bytes_atomic(path, json.dumps(settings, indent=1).encode())


def run(args: argparse.Namespace) -> int:
    """Make the data, run the pipeline, write the report."""
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("wsss.pipeline").setLevel(logging.INFO)
    out = Path(args.out)
    synth = {**SYNTH, "num_train": args.num_train, "num_val": args.num_val}
    _check_settings(out, {"synth": synth, "steps": args.steps, "supervised": args.supervised})
    data = out / "data"
    start = time.perf_counter()
    if not (data / "ImageSets" / "Segmentation" / "val.txt").is_file():
        print(f"[1/3] synthetic dataset -> {data}", file=sys.stderr)
        make_synthetic(data, progress=True, **synth)
    steps = [f"train.steps={args.steps}"] if args.steps else []
    settings = PipelineSettings(data=data, run_root=out / "runs", recipe="demo", methods=list(METHODS),
                                warm_start="baseline", segment="best", supervised=args.supervised,
                                matrix_of=["baseline"],  # the other models: their own map and the CAM (time)
                                overrides=steps, segment_overrides=steps, device=args.device, resume=True)
    print(f"[2/3] pipeline: {', '.join(METHODS)} -> {settings.run_root}", file=sys.stderr)
    results = run_pipeline(settings, on_update=lambda r: write_results(out, r))
    print(f"[3/3] report -> {out / 'report.md'}", file=sys.stderr)
    write_results(out, results)
    write_report(out, results, options.resolve_device(args.device))
    print(results_table(results))
    print(f"demo finished in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


def write_results(out: Path, results: dict[str, Any]) -> None:
    """``results.json``: ``methods`` holds every map formula's mIoU on the baseline model, ``pipeline`` the whole
    run (the keys of ``benchmarks/pipeline.py``)."""
    maps = results["maps"].get("baseline", {})
    payload = {"methods": {name: {"miou": miou} for name, miou in maps.items()}, "pipeline": results}
    write_bytes_atomic(out / "results.json", json.dumps(payload, indent=2).encode())


# ------------------------------------------------------------------------------------------------- report


def findings(results: dict[str, Any]) -> list[str]:
    """A sentence for every paper method that does not beat the baseline on this set, with what the numbers say
    about why: whether the classifier itself changed (its CAM) or only the map the method reads."""
    base = results["methods"].get("baseline")
    maps = results["maps"]
    notes = []
    for name, row in results["methods"].items():
        if name == "baseline" or base is None:
            continue
        own = get_method(name).own_map
        mine, theirs = maps[name].get(own), maps["baseline"].get(own)
        if mine is not None and theirs is not None and mine < theirs:
            cam_before, cam_after = maps["baseline"].get("cam"), maps[name].get("cam")
            if cam_before is None or cam_after is None:
                why = "the CAM of the two models was not scored"
            elif cam_after < cam_before - 0.01:
                why = (f"its classifier got worse too (CAM {100 * cam_before:.1f} -> {100 * cam_after:.1f}), so the "
                       "training steps hurt the features the map is made of")
            elif cam_after > cam_before + 0.01:
                why = (f"yet its classifier's CAM rose ({100 * cam_before:.1f} -> {100 * cam_after:.1f}), so the loss "
                       f"is in what the {own} map adds to the classifier's evidence (attention or its gradients)")
            else:
                why = (f"its classifier's CAM did not move ({100 * cam_before:.1f} -> {100 * cam_after:.1f}), so the "
                       f"objective changed what the {own} map reads (attention or its gradients) for the worse")
            notes.append(f"- **{name}** does not beat the baseline with its own map: `{own}` gives "
                         f"{100 * mine:.1f} on the {name} model against {100 * theirs:.1f} on the baseline model; "
                         f"{why}.")
        mine_p, theirs_p = (row.get("pseudo_train") or {}).get("miou"), (base.get("pseudo_train") or {}).get("miou")
        if mine_p is not None and theirs_p is not None and mine_p < theirs_p:
            notes.append(f"- **{name}**'s pseudo labels ({row['pseudo_train']['refine']} refinement, "
                         f"{row['pseudo_train']['rule']} rule) score {100 * mine_p:.1f} against the baseline's "
                         f"{100 * theirs_p:.1f}.")
    return notes


def maps_picture(run_dir: Path, method: str, dataset: VOCDataset, threshold: float | None,
                 device: torch.device) -> np.ndarray:
    """Rows of val images (:func:`wsss.train.validate.map_grid`, as TensorBoard shows them): input, ground truth,
    the label map of the method's own maps, a titled heat map per class, the legend and the colour bar."""
    model, spec = checkpoint.load(run_dir, device)
    view = spec.config.get("val", {}) if spec.config else {}
    indices = list(range(min(PICTURE_IMAGES, len(dataset))))
    return map_grid(classifier_of(model), dataset, indices, get_method(method).own_map, threshold,
                    scales=view.get("scales", [1.0]), flip=view.get("flip", False), device=device, mean=spec.mean,
                    std=spec.std, tile=TILE)


def labels_picture(dataset: VOCDataset, folders: dict[str, Path], count: int = PICTURE_IMAGES) -> np.ndarray:
    """Rows of images: input, ground truth, then each folder's label PNG of that image (titled by its key)."""
    return labels_grid(dataset, folders, range(min(count, len(dataset))), tile=TILE)


def write_report(out: Path, results: dict[str, Any], device: torch.device) -> None:
    """``report.md`` and its pictures from the pipeline's results."""
    settings = results["settings"]
    data = Path(settings["data"])
    val, train = VOCDataset(data, settings["eval_split"]), VOCDataset(data, settings["train_split"])
    pct = lambda x: "—" if x is None else f"{100 * x:.1f}"  # noqa: E731
    lines = ["# wsss demo", "",
             f"A synthetic set ({settings['num_train']} train / {settings['num_eval']} val images, "
             f"{len(val.classes.names) - 1} object classes) made to show what the papers fix: every object has a "
             "part shared by all classes (a classifier only needs the other part), each class prefers one "
             "background scene, and some backgrounds are plain fields. The baseline trains from scratch on the "
             "image labels; ACR, AReAM and GETAM continue from its classifier with their own objectives "
             "(the `*_demo` presets). All numbers are mIoU in %.", "",
             "## Seeds, pseudo labels and segmentation", "",
             "*seed*: the method's own map, at the best background threshold of a sweep, on the train and val "
             "images; *pseudo*: the train images' pseudo labels with the method's own refinement and rule, scored "
             "over the pixels they label, and the fraction of pixels they label; *segment*: a segmentation model "
             f"trained on the best pseudo labels ({settings.get('segmented', '—')}'s), on val.", "",
             results_table(results), "",
             "The second table is every map formula (columns) on every trained model (rows), on val: a row shows "
             "what a method's training does to every map, a column what a formula makes of every model.", ""]
    notes = findings(results)
    if notes:
        lines += ["### Where a paper method loses to its baseline here", "", *notes, "",
                  "These are short CPU runs on a toy set: a method that loses here is not shown to lose on real "
                  "data (see `benchmarks/pipeline.py` on MSRC).", ""]
    lines += ["## Pictures", "", "Heat maps: one per class present, coloured by the bar on the right (blue 0, red "
              "1). Label maps use the dataset's palette (legend under each picture).", ""]
    for name, row in results["methods"].items():
        picture = maps_picture(Path(row["run_dir"]) / "train", name, val, row.get("train_threshold"), device)
        file = f"maps_{name}.png"
        save_picture(out / file, picture)
        lines += [f"### {name}: its own maps on val (seed {pct(row['seed_eval'])})", "", f"![{name}]({file})", ""]
    folders = {f"{m} pseudo": Path(r["run_dir"]) / "pseudo_train" for m, r in results["methods"].items()}
    save_picture(out / "pseudo_labels.png", labels_picture(train, folders))
    lines += ["### Pseudo labels of train images, by method", "", "![pseudo labels](pseudo_labels.png)", ""]
    segmented = settings.get("segmented")
    if segmented:
        pred = Path(results["methods"][segmented]["run_dir"]) / "segment" / f"pred_{settings['eval_split']}"
        save_picture(out / "segmentation.png", labels_picture(val, {"segmentation": pred}))
        lines += [f"### Segmentation trained on {segmented}'s pseudo labels, on val "
                  f"({pct(results['methods'][segmented].get('segment_eval'))})", "",
                  "![segmentation](segmentation.png)", ""]
    lines += ["## Next: the same on your own data", "", "```bash", *NEXT_STEPS, "```", ""]
    write_bytes_atomic(out / "report.md", "\n".join(lines).encode())
