"""The WSSS protocol on any VOC-layout dataset: train each method, score its seeds, pseudo labels and segmentation.

For each method (any registered in ``wsss methods``; plug-ins included):

1. **train** on the train split's image labels with the method's recipe for this dataset, the preset
   ``<method>_<recipe>`` (``--recipe``, default the dataset folder's name, e.g. ``msrc`` or ``camvid``);
2. **seeds**: the method's own map (``own_map`` in the registry) on the train and on the eval images, mIoU at the
   best background threshold of an exhaustive sweep (argmax over the present classes without a background class);
3. **the matrix**: every map formula of the registry on every trained model, on the eval images, so that what
   training adds is told apart from what the formula adds;
4. **pseudo labels** on the train images with the method's own recipe (``PseudoRecipe`` in the registry: GETAM
   PAMR + label completion, ACR the PSA background and CRF, AReAM PAR with two thresholds, baseline PAR with a
   threshold), scored against the train masks as the mIoU over the pixels they label, and the fraction of the
   labelled ground-truth pixels they label (coverage). A threshold rule uses the best threshold of the train sweep;
5. **segmentation**: the ``segment_<recipe>`` preset trained on those pseudo labels, scored on the eval split.

References in the same run: the same segmentation preset trained on the true train masks (``supervised``), and two
priors that use the true image labels and no learning: a centred Gaussian per present class (``centre``) and each
class's mean mask over the train masks (``mean_mask``). All numbers are fractions in [0, 1]:

    {"methods": {M: {"seed_train", "seed_eval", "pseudo_train": {"miou", "coverage"}, "segment_eval"}},
     "maps": {M: {MAP: x}}, "priors": {"centre", "mean_mask"}, "supervised": {"segment_eval"}}

Every run and intermediate folder goes under ``--run-root``; with ``--resume`` finished stages are read back from
``RUN_ROOT/stages.json`` and interrupted ones continue. The JSON is rewritten after every stage.

    python benchmarks/pipeline.py --data ../shared/data/msrc --train-split train --eval-split val \\
        --methods baseline getam acr aream --out benchmarks/results/pipeline_msrc.json --run-root runs/pipe --resume
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from common import RESULTS_DIR, VIT_TINY_FILE, environment, markdown_table, set_threads, shared_data_dir, write_json
from wsss.data.io import IGNORE_INDEX, load_maps, read_mask, save_maps, write_mask
from wsss.data.voc import VOCDataset
from wsss.evaluate import ConfusionMatrix, ThresholdSweep, threshold_grid
from wsss.localize.split import iter_split_maps
from wsss.methods import REGISTRY, Method, get_method
from wsss.models import SegmentationModel
from wsss.pseudo.generate import PseudoSettings, pseudo_label_for
from wsss.segment.predict import predict_split
from wsss.train import Trainer, load_config
from wsss.train.validate import maps_miou, sweep_result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="VOC-layout dataset root")
    p.add_argument("--train-split", default="train", help="split the methods train on (image labels only)")
    p.add_argument("--eval-split", default="val", help="held-out split the maps and segmentation are scored on")
    p.add_argument("--methods", nargs="+", default=None,
                   help="registered methods (default: every method with a <method>_<recipe> preset)")
    p.add_argument("--maps", nargs="+", default=None, help="map formulas of the matrix (default: all registered)")
    p.add_argument("--recipe", default=None,
                   help="preset suffix: <method>_<recipe> and segment_<recipe> (default: the data folder's name)")
    p.add_argument("--weights", default=None,
                   help="model.weights of every run (default: the shared ViT-Ti when present; 'none' for none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every classifier run (repeatable)")
    p.add_argument("--segment-set", dest="segment_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every segmentation run (repeatable)")
    p.add_argument("--segment-preset", default=None,
                   help="preset (or YAML file) of the segmentation runs (default: segment_<recipe>)")
    p.add_argument("--no-segment", action="store_true", help="skip the segmentation stage and its reference")
    p.add_argument("--limit", type=int, default=None, help="score only the first N eval images")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--run-root", type=Path, default=Path("runs/pipeline"), help="where runs and outputs go")
    p.add_argument("--resume", action="store_true", help="reuse the finished stages found in --run-root")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "pipeline.json", help="results JSON")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------- stages


class Stages:
    """Finished stage results, kept in ``RUN_ROOT/stages.json`` so that ``--resume`` skips them."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.done: dict[str, Any] = json.loads(path.read_text()) if resume and path.is_file() else {}

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        if name not in self.done:
            start = time.perf_counter()
            self.done[name] = fn()
            print(f"  {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
            write_json(self.path, self.done)
        return self.done[name]


def recipe_of(args: argparse.Namespace) -> str:
    return args.recipe or args.data.resolve().name


def methods_of(args: argparse.Namespace) -> list[Method]:
    if args.methods:
        return [get_method(m) for m in args.methods]
    recipe = recipe_of(args)
    found = [m for m in REGISTRY.wsss_methods() if f"{m.name}_{recipe}" in m.preset_names()]
    if not found:
        raise SystemExit(f"no method has a '<method>_{recipe}' preset; give --recipe or --methods")
    return found


def weights_of(args: argparse.Namespace) -> str | None:
    if args.weights == "none":
        return None
    if args.weights:
        return args.weights
    shared = shared_data_dir() / "weights" / VIT_TINY_FILE
    return str(shared) if shared.is_file() else None


def train(preset: str, run_dir: Path, args: argparse.Namespace, overrides: list[str]) -> Trainer:
    """Train (or, with ``--resume``, finish or reload) one run; returns its Trainer with the model in eval mode."""
    base = [f"data.root={args.data}", f"data.split={args.train_split}", f"run_dir={run_dir}",
            f"device={args.device}", "val.every=0"]
    weights = weights_of(args)
    if weights is not None:
        base.append(f"model.weights={weights}")
    trainer = Trainer(load_config(preset, base + overrides))
    trainer.fit(resume=args.resume)
    trainer.model.eval()
    return trainer


def classifier_of(model: torch.nn.Module) -> torch.nn.Module:
    """The ViT with its classifier (an end-to-end method trains a segmentation model around it)."""
    return model.encoder if isinstance(model, SegmentationModel) else model


def view_options(trainer: Trainer) -> dict[str, Any]:
    v = trainer.cfg["val"]
    return dict(scales=v["scales"], flip=v["flip"], device=trainer.device, mean=trainer.mean, std=trainer.std)


def new_sweep(dataset: VOCDataset) -> ThresholdSweep:
    thresholds = threshold_grid(0.0, 1.0, 0.01) if dataset.classes.has_background else [0.0]
    return ThresholdSweep(dataset.classes.num_classes, thresholds, has_background=dataset.classes.has_background,
                          class_names=dataset.classes.names)


def seeds_on_train(trainer: Trainer, method: Method, dataset: VOCDataset, maps_dir: Path) -> dict[str, Any]:
    """The own map of every train image, saved for the pseudo-label stage, and its best-threshold mIoU."""
    sweep = new_sweep(dataset)
    todo = [i for i, image_id in enumerate(dataset.ids) if not (maps_dir / f"{image_id}.npz").is_file()]
    for i, (image_id, maps, labels) in zip(todo, iter_split_maps(classifier_of(trainer.model), dataset,
                                                                 method.own_map, indices=todo,
                                                                 **view_options(trainer))):
        save_maps(maps_dir / f"{image_id}.npz", maps, labels)
    # Scored from the saved (float16) maps: the ones the pseudo labels are made from.
    for i, image_id in enumerate(dataset.ids):
        maps, labels = load_maps(maps_dir / f"{image_id}.npz", dataset.classes.num_classes)
        sweep.update(maps, labels, dataset.load_mask(i))
    return sweep_result(sweep, dataset)


def pseudo_labels(method: Method, dataset: VOCDataset, maps_dir: Path, out_dir: Path,
                  train_threshold: float | None) -> dict[str, float]:
    """Pseudo labels of the train split with the method's recipe, scored over the pixels they label."""
    recipe = method.pseudo
    if recipe is None:
        raise SystemExit(f"method {method.name!r} declares no pseudo-label recipe")
    params = dict(recipe.params)
    if recipe.rule == "threshold" and train_threshold is not None:
        params["bg_threshold"] = train_threshold  # the best threshold of the train sweep, as the papers report
    settings = PseudoSettings(maps_dir=maps_dir, num_classes=dataset.classes.num_classes,
                              has_background=dataset.classes.has_background, rule=recipe.rule, refine=recipe.refine,
                              iterations=recipe.iterations, crf=recipe.crf, scale=recipe.scale,
                              softmax=recipe.softmax, **params)
    matrix = ConfusionMatrix(dataset.classes.num_classes, class_names=dataset.classes.names)
    for i, image_id in enumerate(dataset.ids):
        path = out_dir / f"{image_id}.png"
        if not path.is_file():
            write_mask(path, pseudo_label_for(settings, image_id, dataset.image_path(image_id)))
        matrix.update(read_mask(path), dataset.load_mask(i))  # 255 in a pseudo label: no label (coverage)
    metrics = matrix.compute()
    return {"miou": float(metrics["miou"]), "coverage": float(metrics["coverage"]), "rule": recipe.rule,
            "refine": recipe.refine}


def segment_and_score(args: argparse.Namespace, run_dir: Path, mask_dir: Path | None,
                      eval_set: VOCDataset) -> dict[str, float]:
    """Train the ``segment_<recipe>`` preset on ``mask_dir`` (None: the true masks) and score it on the eval split."""
    overrides = list(args.segment_overrides) + ([f"data.mask_dir={mask_dir}"] if mask_dir is not None else [])
    trainer = train(args.segment_preset or f"segment_{recipe_of(args)}", run_dir, args, overrides)
    pred_dir = run_dir / f"pred_{args.eval_split}"
    predict_split(trainer.model, eval_set, pred_dir, mean=trainer.mean, std=trainer.std, device=trainer.device)
    matrix = ConfusionMatrix(eval_set.classes.num_classes, class_names=eval_set.classes.names)
    for i, image_id in enumerate(eval_set.ids):
        matrix.update(read_mask(pred_dir / f"{image_id}.png"), eval_set.load_mask(i))
    return {"segment_eval": float(matrix.compute()["miou"])}


def eval_subset(dataset: VOCDataset, limit: int | None) -> VOCDataset:
    """The first ``limit`` images of ``dataset`` (the dataset itself when None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    dataset.ids = dataset.ids[:limit]
    return dataset


# ------------------------------------------------------------------------------------------------- priors


def _prior_sweep(dataset: VOCDataset, prior: Callable[[int, tuple[int, int]], np.ndarray]) -> float:
    sweep = new_sweep(dataset)
    for i in range(len(dataset)):
        gt = dataset.load_mask(i)
        present = np.flatnonzero(dataset.labels(i) > 0)
        classes = np.array([dataset.classes.output_to_label(o) for o in present], dtype=np.int64)
        maps = np.stack([prior(int(c), gt.shape) for c in classes]) if classes.size else np.zeros((0, *gt.shape))
        sweep.update(maps.astype(np.float32), classes, gt)
    return float(sweep.best()[1]["miou"])


def centre_prior(dataset: VOCDataset) -> float:
    """Best-threshold mIoU of a centred Gaussian (sigma a quarter of each side) for every present class."""
    def gaussian(_: int, size: tuple[int, int]) -> np.ndarray:
        ys = (np.arange(size[0]) - (size[0] - 1) / 2) / (size[0] / 4)
        xs = (np.arange(size[1]) - (size[1] - 1) / 2) / (size[1] / 4)
        return np.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))

    return _prior_sweep(dataset, gaussian)


def mean_mask_prior(train_set: VOCDataset, eval_set: VOCDataset, side: int = 64) -> float:
    """Best-threshold mIoU of each class's mean mask over the train masks (at a ``side`` x ``side`` grid)."""
    sums = np.zeros((train_set.classes.num_classes, side, side))
    counts = np.zeros(train_set.classes.num_classes)
    for i in range(len(train_set)):
        gt = torch.from_numpy(train_set.load_mask(i).astype(np.int64))[None, None].float()
        small = F.interpolate(gt, size=(side, side), mode="nearest")[0, 0].numpy()
        for c in np.unique(small):
            if c != IGNORE_INDEX:
                sums[int(c)] += small == c
                counts[int(c)] += 1
    means = sums / np.maximum(counts, 1)[:, None, None]

    def mean_mask(c: int, size: tuple[int, int]) -> np.ndarray:
        grid = torch.from_numpy(means[c])[None, None].float()
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()

    return _prior_sweep(eval_set, mean_mask)


# --------------------------------------------------------------------------------------------------- main


def table(results: dict[str, Any]) -> str:
    rows = []
    for name, r in results["methods"].items():
        pseudo = r.get("pseudo_train", {})
        rows.append([name, f"{100 * r['seed_train']:.1f}", f"{100 * r['seed_eval']:.1f}",
                     f"{100 * pseudo['miou']:.1f}" if pseudo else "—",
                     f"{100 * pseudo['coverage']:.0f}%" if pseudo else "—",
                     f"{100 * r['segment_eval']:.1f}" if r.get("segment_eval") is not None else "—"])
    priors = results["priors"]
    supervised = results.get("supervised", {}).get("segment_eval")
    rows.append(["prior: centre / mean mask", "", f"{100 * priors['centre']:.1f} / {100 * priors['mean_mask']:.1f}",
                 "", "", ""])
    if supervised is not None:
        rows.append(["supervised (true masks)", "", "", "", "", f"{100 * supervised:.1f}"])
    out = markdown_table(["method", "seed train", "seed eval", "pseudo mIoU", "coverage", "segment eval"], rows)
    maps = results["maps"]
    formulas = sorted({f for row in maps.values() for f in row})
    out += "\n\n" + markdown_table(["trained with \\ map"] + formulas,
                                   [[m] + [f"{100 * maps[m][f]:.1f}" if f in maps[m] else "" for f in formulas]
                                    for m in maps])
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    methods = methods_of(args)
    recipe = recipe_of(args)
    formulas = args.maps or sorted(REGISTRY.maps())
    args.run_root.mkdir(parents=True, exist_ok=True)
    stages = Stages(args.run_root / "stages.json", args.resume)
    train_set = VOCDataset(args.data, args.train_split, require_masks=True)
    eval_set = eval_subset(VOCDataset(args.data, args.eval_split, require_masks=True), args.limit)
    print(f"{len(methods)} method(s) {[m.name for m in methods]}, recipe {recipe!r}, {len(train_set)} train / "
          f"{len(eval_set)} eval images, runs in {args.run_root}", file=sys.stderr)

    results: dict[str, Any] = {"methods": {}, "maps": {}, "priors": {}, "settings": {
        "data": str(args.data), "train_split": args.train_split, "eval_split": args.eval_split, "recipe": recipe,
        "num_train": len(train_set), "num_eval": len(eval_set), "overrides": args.overrides}}
    results["priors"]["centre"] = stages.run("prior/centre", lambda: centre_prior(eval_set))
    results["priors"]["mean_mask"] = stages.run("prior/mean_mask", lambda: mean_mask_prior(train_set, eval_set))
    write_json(args.out, {**results, "environment": environment(args.device)})

    for method in methods:
        print(f"[{method.name}]", file=sys.stderr)
        run = args.run_root / method.name
        trainer = train(f"{method.name}_{recipe}", run / "train", args, list(args.overrides))
        model, views = classifier_of(trainer.model), view_options(trainer)
        seed_train = stages.run(f"{method.name}/seed_train",
                                lambda: seeds_on_train(trainer, method, train_set, run / "maps_train"))
        row: dict[str, Any] = {"seed_train": seed_train["miou"], "train_threshold": seed_train["threshold"]}
        results["maps"][method.name] = {}
        for formula in formulas:
            scored = stages.run(f"{method.name}/maps/{formula}",
                                lambda: maps_miou(model, eval_set, formula, **views)["miou"])
            results["maps"][method.name][formula] = scored
        row["seed_eval"] = results["maps"][method.name].get(method.own_map) if method.own_map in formulas else \
            stages.run(f"{method.name}/maps/{method.own_map}",
                       lambda: maps_miou(model, eval_set, method.own_map, **views)["miou"])
        row["pseudo_train"] = stages.run(f"{method.name}/pseudo_train",
                                         lambda: pseudo_labels(method, train_set, run / "maps_train",
                                                               run / "pseudo_train", seed_train["threshold"]))
        if not args.no_segment:
            row.update(stages.run(f"{method.name}/segment",
                                  lambda: segment_and_score(args, run / "segment", run / "pseudo_train", eval_set)))
        results["methods"][method.name] = row
        write_json(args.out, {**results, "environment": environment(args.device)})

    if not args.no_segment:
        results["supervised"] = stages.run("supervised/segment", lambda: segment_and_score(
            args, args.run_root / "supervised", None, eval_set))
    write_json(args.out, {**results, "environment": environment(args.device)})
    print(table(results))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
