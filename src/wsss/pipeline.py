"""The WSSS protocol on a VOC-layout dataset: train each method, score its seeds, pseudo labels and segmentation.

For each method (any registered in ``wsss methods``; plug-ins included):

1. **train** on the train split's image labels with the method's recipe for this dataset, the preset
   ``<method>_<recipe>`` (e.g. ``acr_msrc``);
2. **seeds**: the method's own map (``own_map`` in the registry) on the train and on the eval images, mIoU at the
   best background threshold of an exhaustive sweep (argmax over the present classes without a background class);
3. **the matrix**: every map formula of the registry on every trained model, on the eval images, so that what
   training adds is told apart from what the formula adds;
4. **pseudo labels** on the train images with the method's own recipe (``PseudoRecipe`` in the registry), scored
   against the train masks as the mIoU over the pixels they label and the fraction of the labelled ground-truth
   pixels they label (coverage). A threshold rule uses the best threshold of the train sweep;
5. **segmentation**: the ``segment_<recipe>`` preset trained on those pseudo labels, scored on the eval split
   (every method's, only the best pseudo labels', or none: :attr:`PipelineSettings.segment`). A method that trains
   a segmentation model itself (GETAM end to end) also gets ``own_segment_eval``: that model's output on the eval
   split (the single-stage result).
6. with ``mask_steps`` including ``psa``, **PSA's two-stage mask step** beside the refinement recipe: confident
   labels of the train seeds (PSA CRF at alpha 1 and 12), an AffinityNet trained on them (the
   ``affinity_<recipe>`` preset), the seeds random-walked with it (background score: the seeds' train threshold,
   as the threshold rules are calibrated), scored as pseudo labels and segmented like them, under ``psa``.

With ``segment_test`` (:class:`SegmentTest`: views and a dense CRF, the papers' test protocol) every segmentation
model is also scored that way, as ``segment_eval_test`` beside the single-view ``segment_eval``.

References in the same run: the segmentation preset trained on the true train masks (``supervised``) and the two
priors of :mod:`wsss.evaluate.priors`. All numbers are fractions in [0, 1]:

    {"methods": {M: {"seed_train", "seed_eval", "pseudo_train": {"miou", "coverage"}, "segment_eval"}},
     "maps": {M: {MAP: x}}, "priors": {"centre", "mean_mask"}, "supervised": {"segment_eval"}}

and with the PSA step ``methods[M]["psa"] = {"confident": {"miou", "coverage"}, "pseudo_train": {...},
"segment_eval"}``.

Finished stages are kept in ``RUN_ROOT/stages.json``; with ``resume`` they are read back and interrupted training
runs continue from their last checkpoint. ``benchmarks/pipeline.py`` and ``wsss demo`` both run this.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from .data.io import load_maps, read_mask, save_maps, write_bytes_atomic, write_mask
from .data.voc import VOCDataset
from .errors import ConfigError
from .evaluate import ConfusionMatrix
from .evaluate.priors import centre_prior, mean_mask_prior, new_sweep
from .localize.base import checked_scales
from .localize.split import iter_split_maps
from .methods import REGISTRY, Method, get_method
from .models.segmenter import Segmenter
from .models.checkpoint import MODEL_FILE
from .pseudo.generate import PseudoSettings, pseudo_label_for
from .pseudo.random_walk import walk_settings_of, walk_split
from .refine.affinity import PSA_BACKGROUND
from .refine.crf import crf_params
from .segment.predict import checked_fusion, predict_split
from .train import Trainer, load_config
from .settings import changed_settings, describe_changes
from .train.validate import maps_miou, sweep_result

log = logging.getLogger(__name__)

MASK_STEPS = ("refine", "psa")  # the method's pseudo-label recipe; PSA's AffinityNet and random walk
PSA_ALPHAS = (1.0, 12.0)  # methods.md §4: the confident labels' low and high alpha


@dataclass(frozen=True)
class SegmentTest:
    """How a segmentation model is tested: the views of ``scales`` (and their flips) combined by ``fusion`` (``mean``:
    the softmax of the averaged logits; ``max``: the pixel-wise maximum of each scale's softmax, as AReAM's test
    does, see :func:`wsss.segment.predict.predict_probs`), then the CRF preset ``crf`` (None: argmax). The papers
    test this way (AReAM: scales 0.5 to 1.5, max, CRF; GETAM: 3 sizes, CRF)."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    crf: str | None = None
    fusion: str = "mean"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", checked_scales(self.scales))  # frozen: the checked floats replace them
        if self.crf is not None:
            crf_params(self.crf)  # an unknown preset is an error now, not after the training runs
        checked_fusion(self.fusion)  # as the CRF preset: refused before anything trains

    @property
    def tag(self) -> str:
        """The protocol in a name: the stage and prediction folder of its scores."""
        scales = "-".join(f"{s:g}" for s in self.scales)
        return (f"s{scales}" + ("_flip" if self.flip else "") + ("_max" if self.fusion == "max" else "")
                + (f"_crf-{self.crf}" if self.crf else ""))


@dataclass
class PipelineSettings:
    """What :func:`run_pipeline` runs. Paths are used as given; nothing is read from the environment."""

    data: Path
    run_root: Path
    train_split: str = "train"
    eval_split: str = "val"
    methods: list[str] | None = None       # default: every method with a <method>_<recipe> preset
    maps: list[str] | None = None          # formulas of the matrix; default: every registered map
    matrix_of: list[str] | None = None     # methods whose models get every formula (None: all); the others get
                                           # their own map and the CAM
    recipe: str | None = None              # preset suffix; default: the data folder's name
    weights: str | None = None             # model.weights of every run (None: the presets')
    overrides: list[str] = field(default_factory=list)          # for every classifier run
    segment_overrides: list[str] = field(default_factory=list)  # for every segmentation run
    segment_preset: str | None = None      # default: segment_<recipe>
    segment: Literal["all", "best", "none"] = "all"
    supervised: bool = True                # also train the segmentation preset on the true masks
    warm_start: str | None = None          # a method whose trained classifier initialises the other methods
    mask_steps: list[str] = field(default_factory=lambda: ["refine"])  # "refine" (the method's recipe), "psa"
    segment_test: SegmentTest | None = None  # also score every segmentation model this way (segment_eval_test)
    limit: int | None = None               # score only the first N eval images
    device: str = "cpu"
    resume: bool = False

    def __post_init__(self) -> None:
        self.data, self.run_root = Path(self.data), Path(self.run_root)
        if self.segment not in ("all", "best", "none"):
            raise ConfigError(f"segment must be 'all', 'best' or 'none', got {self.segment!r}")
        unknown = sorted(set(self.mask_steps) - set(MASK_STEPS))
        if unknown or not self.mask_steps:
            raise ConfigError(f"mask_steps must be some of {MASK_STEPS}, got {self.mask_steps}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be a positive number of images, got {self.limit}")

    @property
    def recipe_name(self) -> str:
        """The preset suffix: ``recipe``, else the data folder's name."""
        return self.recipe or self.data.resolve().name

    def describe(self) -> dict[str, Any]:
        """The settings that decide the cached numbers, as JSON values: not ``resume``, and not ``segment_test``,
        whose scores are cached under stage names that carry its :attr:`SegmentTest.tag`."""
        skip = ("resume", "segment_test")
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k not in skip}
        out["data"] = str(self.data.resolve())
        return out


class Stages:
    """Finished stage results, kept in ``path`` (JSON) with the settings that made them, so that a resumed pipeline
    skips them; resuming with other settings is an error naming the difference (the cached numbers would not be the
    new settings' numbers)."""

    def __init__(self, path: Path, resume: bool, settings: dict[str, Any]):
        self.path = path
        self.settings = settings
        self.done: dict[str, Any] = {}
        if resume and path.is_file():
            saved = json.loads(path.read_text())
            changes = changed_settings(saved.get("settings", {}), settings)
            if changes:
                raise ConfigError(f"{path}: the finished stages were made with other settings "
                                  f"({describe_changes(changes)}); resume with the same settings or use another "
                                  "run root")
            self.done = saved.get("done", {})

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """``fn()``'s result, computed once: later calls (and resumed runs) read it back."""
        if name not in self.done:
            start = time.perf_counter()
            self.done[name] = fn()
            log.info("%s: %.0f s", name, time.perf_counter() - start)
            payload = {"settings": self.settings, "done": self.done}
            write_bytes_atomic(self.path, json.dumps(payload, indent=1).encode())
        return self.done[name]


def pipeline_methods(settings: PipelineSettings) -> list[Method]:
    """The methods to run: those named, or every registered method with a ``<method>_<recipe>`` preset."""
    if settings.methods:
        return [get_method(m) for m in settings.methods]
    recipe = settings.recipe_name
    found = [m for m in REGISTRY.wsss_methods() if f"{m.name}_{recipe}" in m.preset_names()]
    if not found:
        raise ConfigError(f"no method has a '<method>_{recipe}' preset; name a recipe or the methods")
    return found


def first_images(dataset: VOCDataset, limit: int | None) -> VOCDataset:
    """A view of the first ``limit`` images of ``dataset`` (``dataset`` itself when None); the original is kept."""
    if limit is None or limit >= len(dataset):
        return dataset
    subset = copy.copy(dataset)
    subset.ids = list(dataset.ids[:limit])
    return subset


def train_run(preset: str, run_dir: Path, settings: PipelineSettings, overrides: list[str],
              resume: bool | None = None) -> Trainer:
    """Train (or, resuming, finish or reload) one run; returns its Trainer with the model in eval mode.
    ``resume``: None follows ``settings.resume``."""
    base = [f"data.root={settings.data}", f"data.split={settings.train_split}", f"run_dir={run_dir}",
            f"device={settings.device}", "val.every=0"]
    if settings.weights is not None:
        base.append(f"model.weights={settings.weights}")
    trainer = Trainer(load_config(preset, base + overrides))
    trainer.fit(resume=settings.resume if resume is None else resume)
    trainer.model.eval()
    return trainer


def classifier_of(model: torch.nn.Module) -> torch.nn.Module:
    """The ViT with its classifier (an end-to-end method trains a segmentation model around it)."""
    return model.encoder if isinstance(model, Segmenter) else model


def view_options(trainer: Trainer) -> dict[str, Any]:
    """The views a run's maps are made with: its ``val`` scales (or square sizes) and flip, its device and
    normalisation."""
    v = trainer.cfg["val"]
    return dict(scales=v["scales"], square_sizes=v["square_sizes"], flip=v["flip"], device=trainer.device,
                mean=trainer.mean, std=trainer.std)


def seeds_on_train(trainer: Trainer, method: Method, dataset: VOCDataset, maps_dir: Path) -> dict[str, Any]:
    """The own map of every train image, saved for the pseudo-label stage, and its best-threshold mIoU."""
    todo = [i for i, image_id in enumerate(dataset.ids) if not (maps_dir / f"{image_id}.npz").is_file()]
    for image_id, maps, labels in iter_split_maps(classifier_of(trainer.model), dataset, method.own_map,
                                                  indices=todo, **view_options(trainer)):
        save_maps(maps_dir / f"{image_id}.npz", maps, labels)
    # Scored from the saved (float16) maps: the ones the pseudo labels are made from.
    sweep = new_sweep(dataset)
    for i, image_id in enumerate(dataset.ids):
        maps, labels = load_maps(maps_dir / f"{image_id}.npz", dataset.classes.num_classes)
        sweep.update(maps, labels, dataset.load_mask(i))
    return sweep_result(sweep, dataset)


def calibrated_params(rule: str, params: dict[str, float], threshold: float | None) -> dict[str, float]:
    """A pseudo-label rule's parameters moved to the maps' own background threshold (the best of the train sweep).

    The papers' fixed values (a background threshold, PSA's background power ``alpha``, AReAM's two thresholds) suit
    the calibration of their maps; a model trained for a few hundred steps makes maps of another calibration, and a
    fixed value then labels far too much or too little as background. So: ``threshold`` uses ``t`` itself; ``psa``
    the power whose background ``(1 - m) ** alpha`` equals the map ``m`` at ``m = t`` (``alpha = ln t / ln(1 - t)``);
    ``two_thresholds`` keeps the recipe's gap, centred on ``t``. Other rules (GETAM's completion percentile) and a
    dataset without background (``threshold`` None) keep the recipe's values.
    """
    out = dict(params)
    if threshold is None:
        return out
    t = min(max(float(threshold), 0.01), 0.99)
    if rule == "threshold":
        out["bg_threshold"] = float(threshold)
    elif rule == "psa":
        out["alpha"] = math.log(t) / math.log(1.0 - t)
    elif rule == "two_thresholds":
        half = (params["high"] - params["low"]) / 2
        out["high"], out["low"] = min(t + half, 1.0), max(t - half, 0.0)
    return out


def pseudo_labels(method: Method, dataset: VOCDataset, maps_dir: Path, out_dir: Path,
                  train_threshold: float | None) -> dict[str, Any]:
    """Pseudo labels of the train split with the method's recipe, scored over the pixels they label."""
    recipe = method.pseudo
    if recipe is None:
        raise ConfigError(f"method {method.name!r} declares no pseudo-label recipe")
    params = calibrated_params(recipe.rule, recipe.params, train_threshold)
    settings = PseudoSettings(maps_dir=maps_dir, num_classes=dataset.classes.num_classes,
                              has_background=dataset.classes.has_background, rule=recipe.rule, refine=recipe.refine,
                              iterations=recipe.iterations, crf=recipe.crf, scale=recipe.scale,
                              softmax=recipe.softmax, **params)
    write_pseudo_labels(settings, dataset, out_dir)
    return {**label_scores(dataset, out_dir), "rule": recipe.rule, "refine": recipe.refine, "params": params}


def write_pseudo_labels(settings: PseudoSettings, dataset: VOCDataset, out_dir: Path) -> None:
    """``out_dir/<id>.png`` of every image of ``dataset`` that has none yet, with ``settings``."""
    palette = dataset.palette()
    for image_id in dataset.ids:
        path = out_dir / f"{image_id}.png"
        if not path.is_file():
            write_mask(path, pseudo_label_for(settings, image_id, dataset.image_path(image_id)), palette)


def label_scores(dataset: VOCDataset, label_dir: Path) -> dict[str, float]:
    """mIoU over the pixels the PNGs of ``label_dir`` label (255 = no label) and their coverage of the labelled
    ground truth."""
    matrix = ConfusionMatrix(dataset.classes.num_classes, class_names=dataset.classes.names)
    for i, image_id in enumerate(dataset.ids):
        matrix.update(read_mask(label_dir / f"{image_id}.png"), dataset.load_mask(i))
    metrics = matrix.compute()
    return {"miou": float(metrics["miou"]), "coverage": float(metrics["coverage"])}


def psa_masks(settings: PipelineSettings, dataset: VOCDataset, run: Path, threshold: float | None) -> dict[str, Any]:
    """PSA's mask step on the train seeds of ``run/maps_train``: confident labels, AffinityNet, random walk."""
    confident_dir, walk_dir = run / "psa_confident", run / "psa_train"
    confident = PseudoSettings(maps_dir=run / "maps_train", num_classes=dataset.classes.num_classes,
                               has_background=dataset.classes.has_background, rule="psa_confident", refine="crf",
                               crf="psa", low_alpha=PSA_ALPHAS[0], high_alpha=PSA_ALPHAS[1])
    write_pseudo_labels(confident, dataset, confident_dir)
    trainer = train_run(f"affinity_{settings.recipe_name}", run / "affinity", settings,
                        [f"data.mask_dir={confident_dir}"])
    walk = walk_settings_of(trainer.cfg, PSA_BACKGROUND if threshold is None else float(threshold))
    walk_split(trainer.model, dataset, run / "maps_train", walk_dir, walk, trainer.mean, trainer.std, trainer.device,
               progress=False)
    return {"confident": label_scores(dataset, confident_dir), "pseudo_train": label_scores(dataset, walk_dir),
            "walk": walk.describe()}


def segment_trainer(settings: PipelineSettings, run_dir: Path, mask_dir: Path | None,
                    resume: bool | None = None) -> Trainer:
    """The segmentation preset trained (or reloaded) on ``mask_dir`` (None: the true masks)."""
    overrides = list(settings.segment_overrides) + ([f"data.mask_dir={mask_dir}"] if mask_dir is not None else [])
    return train_run(settings.segment_preset or f"segment_{settings.recipe_name}", run_dir, settings, overrides,
                     resume)


def segmentation_miou(trainer: Trainer, eval_set: VOCDataset, pred_dir: Path,
                      test: SegmentTest | None = None) -> float:
    """The mIoU on ``eval_set`` of the segmentation model ``trainer`` trained (predictions written to ``pred_dir``),
    tested with ``test`` (None: one view, argmax)."""
    test = test or SegmentTest()
    predict_split(trainer.model, eval_set, pred_dir, scales=test.scales, flip=test.flip, crf=test.crf,
                  fusion=test.fusion, mean=trainer.mean, std=trainer.std, device=trainer.device)
    matrix = ConfusionMatrix(eval_set.classes.num_classes, class_names=eval_set.classes.names)
    for i, image_id in enumerate(eval_set.ids):
        matrix.update(read_mask(pred_dir / f"{image_id}.png"), eval_set.load_mask(i))
    return float(matrix.compute()["miou"])


def pseudo_score(row: dict[str, Any]) -> float:
    """How good a method's pseudo labels are for training on: mIoU over the labelled pixels times coverage, so
    labelling fewer, easier pixels does not win."""
    pseudo = row.get("pseudo_train") or {}
    return float(pseudo.get("miou", 0.0)) * float(pseudo.get("coverage", 0.0))


def run_pipeline(settings: PipelineSettings,
                 on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the protocol and return its results (the shape in the module docstring, plus ``settings`` and, per
    method, ``train_threshold``, ``run_dir`` and the pseudo rule). ``on_update`` gets the results after every
    method, so a caller can write them as they grow."""
    methods = pipeline_methods(settings)
    if settings.warm_start is not None and settings.warm_start not in [m.name for m in methods]:
        raise ConfigError(f"warm_start {settings.warm_start!r} is not one of the methods run")
    # The warm-start method trains first: the others start from its weights.
    methods.sort(key=lambda m: m.name != settings.warm_start)
    recipe = settings.recipe_name
    formulas = settings.maps or sorted(REGISTRY.maps())
    settings.run_root.mkdir(parents=True, exist_ok=True)
    stages = Stages(settings.run_root / "stages.json", settings.resume, settings.describe())
    train_set = VOCDataset(settings.data, settings.train_split, require_masks=True)
    eval_set = first_images(VOCDataset(settings.data, settings.eval_split, require_masks=True), settings.limit)
    log.info("%d method(s) %s, recipe %r, %d train / %d eval images, runs in %s", len(methods),
             [m.name for m in methods], recipe, len(train_set), len(eval_set), settings.run_root)
    update = on_update or (lambda _: None)
    test = settings.segment_test

    def tested(name: str, trainer_of: Callable[[], Trainer], pred_dir: Path) -> dict[str, float]:
        """``name``'s score with the test protocol (``segment_test``; nothing without one), on the model
        ``trainer_of()`` gives, predicted to ``pred_dir_<tag>``: cached under the protocol's tag."""
        if test is None:
            return {}
        return {"segment_eval_test": stages.run(f"{name}_test/{test.tag}", lambda: segmentation_miou(
            trainer_of(), eval_set, pred_dir.with_name(f"{pred_dir.name}_{test.tag}"), test))}

    def segmented(name: str, run_dir: Path, mask_dir: Path | None) -> dict[str, float]:
        """A segmentation stage: trained and scored with one view, then tested with the protocol. A model trained
        by this process is tested as it is; one a resumed run finished earlier is reloaded from its folder."""
        trained: list[Trainer] = []

        def trainer_of() -> Trainer:
            if not trained:
                trained.append(segment_trainer(settings, run_dir, mask_dir, resume=True if name in stages.done
                                               else None))
            return trained[0]

        pred_dir = run_dir / f"pred_{settings.eval_split}"
        out = dict(stages.run(name, lambda: {"segment_eval": segmentation_miou(trainer_of(), eval_set, pred_dir)}))
        return {**out, **tested(name, trainer_of, pred_dir)}

    results: dict[str, Any] = {"methods": {}, "maps": {}, "priors": {}, "settings": {
        "data": str(settings.data), "train_split": settings.train_split, "eval_split": settings.eval_split,
        "recipe": recipe, "num_train": len(train_set), "num_eval": len(eval_set), "overrides": settings.overrides,
        "warm_start": settings.warm_start, "segment": settings.segment,
        "segment_test": None if test is None else {**asdict(test), "scales": list(test.scales)}}}
    results["priors"]["centre"] = stages.run("prior/centre", lambda: centre_prior(eval_set))
    results["priors"]["mean_mask"] = stages.run("prior/mean_mask", lambda: mean_mask_prior(train_set, eval_set))
    update(results)

    for method in methods:
        log.info("[%s]", method.name)
        run = settings.run_root / method.name
        overrides = list(settings.overrides)
        if settings.warm_start is not None and method.name != settings.warm_start:
            overrides.append(f"model.weights={settings.run_root / settings.warm_start / 'train' / MODEL_FILE}")
        trainer = train_run(f"{method.name}_{recipe}", run / "train", settings, overrides)
        model, views = classifier_of(trainer.model), view_options(trainer)
        seed_train = stages.run(f"{method.name}/seed_train",
                                lambda: seeds_on_train(trainer, method, train_set, run / "maps_train"))
        row: dict[str, Any] = {"seed_train": seed_train["miou"], "train_threshold": seed_train["threshold"],
                               "run_dir": str(run)}
        chosen = formulas if settings.matrix_of is None or method.name in settings.matrix_of else \
            [f for f in formulas if f in ("cam", method.own_map)]
        # A formula that cannot read this model (the mctformer map of a model without the mct head) is left out.
        maps_of = REGISTRY.maps()
        chosen = [f for f in chosen if maps_of[f].applies_to(model)]

        def score(formula: str) -> float:  # one cached stage per model and formula
            return stages.run(f"{method.name}/maps/{formula}",
                              lambda: maps_miou(model, eval_set, formula, **views)["miou"])

        results["maps"][method.name] = {formula: score(formula) for formula in chosen}
        row["seed_eval"] = score(method.own_map)
        row["pseudo_train"] = stages.run(f"{method.name}/pseudo_train",
                                         lambda: pseudo_labels(method, train_set, run / "maps_train",
                                                               run / "pseudo_train", seed_train["threshold"]))
        row["segment_eval"] = None
        if isinstance(trainer.model, Segmenter):  # an end-to-end method (GETAM): its own single-stage output
            own_pred = run / f"own_pred_{settings.eval_split}"
            row["own_segment_eval"] = stages.run(f"{method.name}/own_segment",
                                                 lambda: segmentation_miou(trainer, eval_set, own_pred))
            row.update({f"own_{k}": v for k, v in
                        tested(f"{method.name}/own_segment", lambda: trainer, own_pred).items()})
        if settings.segment == "all" and "refine" in settings.mask_steps:
            row.update(segmented(f"{method.name}/segment", run / "segment", run / "pseudo_train"))
        if "psa" in settings.mask_steps:
            row["psa"] = dict(stages.run(f"{method.name}/psa",
                                         lambda: psa_masks(settings, train_set, run, seed_train["threshold"])))
            if settings.segment == "all":
                row["psa"].update(segmented(f"{method.name}/psa_segment", run / "segment_psa", run / "psa_train"))
        results["methods"][method.name] = row
        update(results)

    if settings.segment == "best" and results["methods"]:
        best = max(results["methods"], key=lambda m: pseudo_score(results["methods"][m]))
        run = settings.run_root / best
        results["methods"][best].update(segmented(f"{best}/segment", run / "segment", run / "pseudo_train"))
        results["settings"]["segmented"] = best
    if settings.supervised and settings.segment != "none":
        results["supervised"] = segmented("supervised/segment", settings.run_root / "supervised", None)
    update(results)
    return results


def results_table(results: dict[str, Any]) -> str:
    """Markdown: the per-method table (seeds, pseudo labels, segmentation, references), then the map matrix. With a
    segmentation test protocol its scores get a column too; with the supervised bound, each segmentation's share of
    it."""
    def pct(x: float | None) -> str:
        return "—" if x is None else f"{100 * x:.1f}"

    test = results.get("settings", {}).get("segment_test")
    supervised = results.get("supervised") or {}
    keys = ["segment_eval"] + (["segment_eval_test"] if test else [])

    def segment_cells(row: dict[str, Any]) -> str:
        cells = []
        for key in keys:
            value, bound = row.get(key), supervised.get(key)
            share = f" ({100 * value / bound:.0f}%)" if value is not None and bound else ""
            cells.append(pct(value) + share)
        return " | ".join(cells)

    header = "segment eval" + (" | segment eval, test protocol" if test else "")
    lines = [f"| method | seed train | seed eval | pseudo mIoU | coverage | {header} |",
             "|---" * (5 + len(keys)) + "|"]
    blanks = " | ".join("" for _ in keys)
    for name, r in results["methods"].items():
        pseudo = r.get("pseudo_train") or {}
        coverage = f"{100 * pseudo['coverage']:.0f}%" if pseudo else "—"
        lines.append(f"| {name} | {pct(r['seed_train'])} | {pct(r['seed_eval'])} | {pct(pseudo.get('miou'))} | "
                     f"{coverage} | {segment_cells(r)} |")
        if r.get("psa"):
            psa = r["psa"]
            lines.append(f"| {name} + PSA random walk (confident {pct(psa['confident']['miou'])}, "
                         f"{100 * psa['confident']['coverage']:.0f}%) | | | {pct(psa['pseudo_train']['miou'])} | "
                         f"{100 * psa['pseudo_train']['coverage']:.0f}% | {segment_cells(psa)} |")
        if r.get("own_segment_eval") is not None:
            own = {k: r.get(f"own_{k}") for k in keys}
            lines.append(f"| {name}, its own segmentation | | | | | {segment_cells(own)} |")
    priors = results["priors"]
    lines.append(f"| prior: centre / mean mask | | {pct(priors['centre'])} / {pct(priors['mean_mask'])} | | | "
                 f"{blanks} |")
    if supervised:
        lines.append(f"| supervised (true masks) | | | | | {' | '.join(pct(supervised.get(k)) for k in keys)} |")
    if test:
        fusion = test.get("fusion", "mean")  # results written before fusion was a setting averaged
        lines.append(f"\nTest protocol: scales {test['scales']}, flip {test['flip']}, fusion {fusion}, "
                     f"CRF {test['crf']}.")
    maps = results["maps"]
    formulas = sorted({f for row in maps.values() for f in row})
    lines += ["", "| trained with \\ map | " + " | ".join(formulas) + " |", "|---" * (len(formulas) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(pct(maps[m].get(f)) if f in maps[m] else "" for f in formulas) + " |"
              for m in maps]
    return "\n".join(lines)
