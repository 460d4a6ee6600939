"""The training engine shared by every objective: data, model, optimiser, checkpoints, resume, DDP, logging.

One step = one global batch. ``torchrun`` processes shard each global batch (see :mod:`.sampler`), gradients are
averaged by DDP, logged numbers are averaged over the processes, and only rank 0 writes files. A resumed run
restores model, optimiser, scheduler, step, objective state and every process's RNG states, and continues the data
order where it stopped, so it ends with the same weights as an uninterrupted run.

An objective is ``objective(model, batch, step) -> (loss, {name: float})``; ``model`` is DDP-wrapped under
``torchrun``. Optional extras: ``build_model(backbone)`` returns the model to train (e.g. with a segmentation
decoder; the checkpoint spec describes whatever it returns); ``lr_scale(step)`` multiplies the scheduled learning rate; ``state_dict()`` /
``load_state_dict(state)`` carry objective state across a resume (``weights_only``-loadable values). The logged
names must be the same on every process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.io import write_bytes_atomic
from ..data.transforms import CenterCrop, Compose, Normalize, Resize, ToTensor, build_transforms
from ..data.voc import VOCDataset, collate
from ..device import resolve_device
from ..evaluate.classification import mean_average_precision
from ..errors import CARRIED, CheckpointError, ConfigError, WorkerFailure, WSSSError, naming
from ..methods import get_method
from ..models import create_model, load_into
from ..models.hub import split_name
from ..models.checkpoint import MODEL_FILE, describe, read_spec, save
from ..models.weights import load_state_dict
from ..settings import changed_settings, describe_changes
from .checkpoint import STATE_FILE, CheckpointManager, rng_state, set_rng_state
from .config import dump_config, read_yaml, validate_config
from .distributed import DistInfo, all_gather_objects, all_reduce_mean, barrier, init_distributed, shutdown
from .objectives import build_objective
from .optim import build_optimizer, build_scheduler
from .runlog import RunLog
from .sampler import ResumableBatchSampler
from .validate import labels_grid, map_grid, maps_sweep, sweep_result

BEST_MODEL_FILE = "model_best.safetensors"  # val.keep_best: the weights of the best validation so far

log = logging.getLogger("wsss.train")

# Settings a resumed run may change freely: they say where, how long and how observed it runs, not what it learns.
# Any other change needs --allow-changes (and is recorded in train.log).
RESUMABLE = ("run_dir", "device", "data.num_workers", "train.steps", "train.log_every", "train.ckpt_every",
             "train.keep_checkpoints", "val.")


class TrainingDiverged(WSSSError):
    """The loss or the gradients became NaN or infinite; the last good checkpoint is kept."""


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), Python's ``random`` and NumPy's global generator."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def worker_init(worker_id: int) -> None:
    """One thread per data worker: N workers x N torch threads would oversubscribe small machines."""
    torch.set_num_threads(1)


class CarryErrors(Dataset):
    """``dataset`` whose loading errors (:data:`~wsss.errors.CARRIED`) come back as a
    :class:`~wsss.errors.WorkerFailure` item: a data-loader worker then hands the error itself to the main process,
    where torch would re-create it from its message (which fails for :class:`~wsss.errors.DataError`)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except CARRIED as exc:
            return WorkerFailure(exc)


def collate_carrying(samples: list[Any]) -> Any:
    """:func:`~wsss.data.voc.collate`, or the first :class:`~wsss.errors.WorkerFailure` among ``samples``."""
    for sample in samples:
        if isinstance(sample, WorkerFailure):
            return sample
    return collate(samples)


class Trainer:
    """Builds everything from a config (see :mod:`.config`) and runs the loop with :meth:`fit`."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        data, m, t = cfg["data"], cfg["model"], cfg["train"]
        if not data["root"]:
            raise ConfigError("data.root is not set (give data.root=PATH)")
        device = resolve_device(cfg["device"], "config key 'device'")
        self.dist: DistInfo = init_distributed(device)
        self.device = torch.device("cuda", self.dist.local_rank) if device.type == "cuda" else device
        self.run_dir = Path(cfg["run_dir"])
        # Rank r is seeded with seed + r: model initialisation follows rank 0 (DDP broadcasts it), dropout differs.
        seed_everything(cfg["seed"] + self.dist.rank)
        transforms = data["transforms"]
        self.mean, self.std = transforms.get("mean", [0.5] * 3), transforms.get("std", [0.5] * 3)
        self.dataset = VOCDataset(data["root"], data["split"], transform=build_transforms(transforms),
                                  labels_file=data["labels_file"], min_label_fraction=data["min_label_fraction"],
                                  seed=cfg["seed"], mask_dir=data["mask_dir"], saliency_dir=data["saliency_dir"],
                                  background=data["background"])
        self.classes = self.dataset.classes
        # Opened now, so that a validation split without masks fails before training, not after val.every steps.
        self.val_dataset = (VOCDataset(data["root"], cfg["val"]["split"], require_masks=cfg["val"]["metric"] == "miou")
                            if cfg["val"]["every"] else None)
        try:
            self.sampler = ResumableBatchSampler(len(self.dataset), data["batch_size"], cfg["seed"], self.dist.rank,
                                                 self.dist.world_size)
        except ValueError as exc:
            raise ConfigError(f"data.batch_size: {exc}") from exc
        backbone = create_model(m["name"], weights=m["weights"], pretrained=m["pretrained"],
                                num_classes=self.classes.num_fg, head=m["head"],
                                pool=m["pool"], drop_path_rate=m["drop_path_rate"])
        self.objective = build_objective(cfg["method"], classes=self.classes, device=self.device, mean=self.mean,
                                         std=self.std)
        if getattr(self.objective, "needs_saliency", False) and data["saliency_dir"] is None:
            # Checked now: the loss first reads the saliency in phase 2, perhaps days into the run.
            raise ConfigError("method.saliency_loss needs saliency maps: set data.saliency_dir=PATH")
        if getattr(self.objective, "needs_roi", False):  # GETAM's dense-CRF loss: each crop's ROI in the batch
            if transforms.get("rand_augment"):
                raise ConfigError("data.transforms.rand_augment moves masks as 8-bit images, which cannot carry the "
                                  "crop's ROI that the dense-CRF loss needs; use one or the other")
            self.dataset.with_roi = True
        # An objective may extend the backbone (e.g. with a segmentation decoder).
        build = getattr(self.objective, "build_model", None)
        self.model = (build(backbone) if build is not None else backbone).to(self.device)
        # Everything a user of the checkpoint needs: architecture, classes, normalisation, method, config.
        self.spec = describe(self.model, split_name(m["name"])[0], self.classes.names, self.mean, self.std,
                             method=get_method(cfg["method"]["name"]).name, config=cfg)
        self.ddp: nn.Module = self.model
        if self.dist.enabled:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=t["find_unused_parameters"])
        self.total_steps = t["steps"]
        self.optimizer = build_optimizer(self.model, cfg["optim"])
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg["optim"],
                                         scale=getattr(self.objective, "lr_scale", None))
        self.ckpt = CheckpointManager(self.run_dir, keep=t["keep_checkpoints"])
        self.runlog = RunLog(self.run_dir, enabled=self.dist.is_main)
        self.step = 0
        self.best_val: float | None = None  # the best validation metric so far (val.keep_best)
        self.notes: list[tuple[int, str]] = []  # (log level, message) of the resume checks, for train.log

    # ------------------------------------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        """The training state of ``state.pt`` (a collective under DDP: every rank's RNG states are gathered)."""
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "rng": all_gather_objects(rng_state(), self.dist),
                 "world_size": self.dist.world_size}
        if hasattr(self.objective, "state_dict"):
            state["objective"] = self.objective.state_dict()
        if self.best_val is not None:
            state["best_val"] = self.best_val
        return state

    def resume(self, fresh_optimizer: bool = False, allow_changes: bool = False) -> bool:
        """Restore the newest checkpoint of the run folder; False when there is none.

        ``fresh_optimizer`` keeps the new optimiser's initial state (the optimiser settings changed) with the
        schedule moved to the checkpoint's step; so does ``allow_changes`` when the saved state is another
        optimiser's, which is otherwise a :class:`CheckpointError`. What it decided is in :attr:`notes`."""
        path = self.ckpt.latest()
        if path is None:
            return False
        load_into(self.model, load_state_dict(path / MODEL_FILE), source=str(path / MODEL_FILE))
        state = self.ckpt.load_state(path)
        step = state.get("step") if isinstance(state, dict) else None
        if not isinstance(step, int) or isinstance(step, bool) or step < 0 or "optimizer" not in state:
            raise CheckpointError(f"{path / STATE_FILE}: not a wsss training state (no step or optimiser state); "
                                  f"write the name of an earlier step_* folder into {self.ckpt.root / 'latest'} to "
                                  f"resume from it")
        if not fresh_optimizer:
            mismatch = self._optimizer_mismatch(state["optimizer"])
            if mismatch and not allow_changes:
                raise CheckpointError(f"{path / STATE_FILE}: holds the state of another optimiser ({mismatch}); "
                                      f"resume with the run's optim settings, or pass --allow-changes to start a "
                                      f"fresh optimiser state")
            if mismatch:
                self.notes.append((logging.WARNING, f"{path / STATE_FILE} holds the state of another optimiser "
                                                    f"({mismatch}): starting a fresh optimiser state"))
                fresh_optimizer = True
        try:
            if fresh_optimizer:
                self._schedule_at(step)
            else:
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
            if "objective" in state:
                self.objective.load_state_dict(state["objective"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{path}: the training state does not fit this config ({exc})") from exc
        self.step = step
        best = state.get("best_val")
        self.best_val = float(best) if isinstance(best, (int, float)) and not isinstance(best, bool) else None
        rngs = state["rng"]
        if len(rngs) != self.dist.world_size:
            log.warning("%s was saved by %d processes, resumed by %d: random streams restart, so the run will not "
                        "repeat an uninterrupted one exactly", path, len(rngs), self.dist.world_size)
            seed_everything(self.cfg["seed"] + self.dist.rank + 7919 * self.step)
        else:
            set_rng_state(rngs[self.dist.rank])
        return True

    def _optimizer_mismatch(self, saved: dict[str, Any]) -> str:
        """Why a saved optimiser state cannot be loaded into this optimiser ('' when it can). torch would load
        another optimiser's groups and fail at the first step (``KeyError: 'momentum'``)."""
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            return "no parameter groups"
        if len(groups) != len(self.optimizer.param_groups):
            return f"{len(groups)} parameter groups, this one has {len(self.optimizer.param_groups)}"
        have = {k for g in groups for k in g}
        missing = sorted({k for g in self.optimizer.param_groups for k in g} - have)
        return f"no {', '.join(missing)} of {type(self.optimizer).__name__}" if missing else ""

    def _schedule_at(self, step: int) -> None:
        """Move the (fresh) scheduler to ``step``: the learning rates the schedule gives there."""
        scheduler = self.scheduler
        scheduler.last_epoch = step
        for group, base, factor in zip(self.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(step)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _resume_changes(self) -> dict[str, tuple[Any, Any]]:
        """The settings that differ from those the newest checkpoint was trained with (its spec's config, else the
        run's ``config.yaml``); empty without a checkpoint. Rank 0 decides for every process."""
        changes: dict[str, tuple[Any, Any]] = {}
        error: WSSSError | None = None
        if self.dist.is_main:
            try:
                path = self.ckpt.latest()
                old = None
                if path is not None:
                    old = read_spec(path / MODEL_FILE).config
                    config_file = self.run_dir / "config.yaml"
                    if old is None and config_file.is_file():
                        old = read_yaml(config_file)  # a ConfigError naming the file if it is not a config
                if old is not None:
                    old = _with_current_defaults(old)
                changes = changed_settings(old, self.cfg) if old is not None else {}
            except WSSSError as exc:  # raised on every process, not only here (the others would wait forever)
                error = exc
        changes, error = all_gather_objects((changes, error), self.dist)[0]
        if error is not None:
            raise error
        return changes

    def _check_run_dir(self, resume: bool) -> None:
        """A new run never writes over an old one. Rank 0 decides for every process (the others may not see the
        folder)."""
        taken = self.dist.is_main and not resume and (self.ckpt.root.exists() or (self.run_dir / MODEL_FILE).exists())
        if all_gather_objects(taken, self.dist)[0]:
            raise ConfigError(f"{self.run_dir} already holds a training run; pass --resume to continue it, or "
                              f"choose another run_dir")

    def _check_changes(self, resume: bool, allow_changes: bool) -> bool:
        """Refuse a resume whose settings changed beyond :data:`RESUMABLE` unless ``allow_changes``; note every
        change for the run log. Returns whether the optimiser settings changed (a fresh optimiser state)."""
        changes = self._resume_changes() if resume else {}
        free = {k: v for k, v in changes.items() if k.startswith(RESUMABLE)}
        kept = {k: v for k, v in changes.items() if k not in free}
        if kept and not allow_changes:
            raise ConfigError(f"{self.run_dir}: resuming with changed settings {describe_changes(kept)}; pass "
                              f"--resume --allow-changes to continue with them, or give the run's values")
        if free:
            self.notes.append((logging.INFO, f"resuming with changed settings: {describe_changes(free)}"))
        if kept:
            self.notes.append((logging.WARNING, f"resuming with changed settings (--allow-changes): "
                                                f"{describe_changes(kept)}"))
        fresh = any(k.startswith("optim.") for k in kept)
        if fresh:
            self.notes.append((logging.WARNING, "the optim settings changed: the optimiser state starts afresh at "
                                                "the checkpoint's step"))
        return fresh

    # ------------------------------------------------------------------------------------------------- data

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Global batches from the current step on, across epoch boundaries, in a resumable order."""
        data = self.cfg["data"]
        epoch, offset = divmod(self.step, self.sampler.batches_per_epoch)
        while True:
            self.sampler.set_position(epoch, offset)
            self.dataset.set_epoch(epoch)  # workers fork at iter(), so they see this epoch
            # A generator of our own: DataLoader draws worker seeds from it, so the global RNG (dropout, the
            # objective's sampling) is not advanced at epoch starts, which a resumed run could not repeat.
            generator = torch.Generator().manual_seed(self.cfg["seed"] * 1_000_003 + epoch)
            workers = data["num_workers"]
            # In this process an error propagates as it is; workers hand theirs over as a WorkerFailure.
            dataset, collate_fn = (CarryErrors(self.dataset), collate_carrying) if workers else (self.dataset, collate)
            loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=collate_fn,
                                pin_memory=self.device.type == "cuda", generator=generator,
                                worker_init_fn=worker_init if workers else None)
            for batch in loader:
                if isinstance(batch, WorkerFailure):
                    batch.reraise()
                yield batch
            epoch, offset = epoch + 1, 0

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    # ------------------------------------------------------------------------------------------------- step

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast with ``train.amp`` (meant for CUDA; it also runs, slowly, on CPU). bf16 has float32's
        range, so no loss scaling is needed."""
        if self.cfg["train"]["amp"]:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _diverged(self, what: str, value: float, logs: dict[str, float]) -> TrainingDiverged:
        last = self.ckpt.latest()
        kept = f"the last good checkpoint {last} is kept" if last is not None else "no checkpoint was written yet"
        message = (f"training diverged: {what} is {value} at step {self.step} (logs {logs}); {kept}. "
                   f"Lower optim.lr, add warm-up (optim.warmup_steps) or set train.grad_clip")
        if self.dist.is_main:
            log.error(message)
        return TrainingDiverged(message)

    def train_step(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        """One optimisation step on this process's share of a global batch; returns its loss and logs.

        Both checks use numbers every process agrees on (the loss averaged over processes, the all-reduced
        gradients), so every process stops together, before the weights are touched."""
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss, logs = self.objective(self.ddp, batch, self.step)
        loss = loss.float()
        loss_mean = float(all_reduce_mean(loss.detach(), self.dist))
        if not math.isfinite(loss_mean):
            raise self._diverged("the loss", loss_mean, logs)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg["train"]["grad_clip"]
        if clip:
            norm = nn.utils.clip_grad_norm_(params, clip)
        else:
            norm = nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        if not math.isfinite(float(norm)):
            raise self._diverged("the gradient norm", float(norm), logs)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return loss.detach(), logs

    def _mean_over_ranks(self, sums: dict[str, float], counts: dict[str, int]) -> dict[str, float]:
        """Per-step means of the window's sums (over the steps that logged each name), averaged over processes
        (equal shares of each global batch)."""
        keys = sorted(sums)
        values = torch.tensor([sums[k] / counts[k] for k in keys], dtype=torch.float64, device=self.device)
        values = all_reduce_mean(values, self.dist).tolist()
        return dict(zip(keys, values))

    # -------------------------------------------------------------------------------------------------- fit

    def fit(self, resume: bool = False, allow_changes: bool = False) -> dict[str, Any]:
        """Train to ``train.steps`` and return the last logged scalars (with ``val`` results when validating).

        Writes (rank 0) ``config.yaml``, ``train.log``, ``metrics.jsonl``, ``checkpoints/``, the final
        ``model.safetensors`` and ``summary.json`` into ``run_dir``, each atomically. ``resume`` continues from the
        newest checkpoint there (a fresh start when there is none); without it an existing run folder is an error.
        A resume whose settings differ from the checkpoint's in more than :data:`RESUMABLE` is a
        :class:`ConfigError` unless ``allow_changes``; changed optim settings then start a fresh optimiser state.
        Every check is made before anything in ``run_dir`` is touched.
        """
        cfg, t_cfg, main = self.cfg, self.cfg["train"], self.dist.is_main
        summary: dict[str, Any] = {}
        batches, bar, finished = None, None, False
        self.notes = []
        try:
            self._check_run_dir(resume)
            fresh_optimizer = self._check_changes(resume, allow_changes)
            resumed = self.resume(fresh_optimizer, allow_changes) if resume else False
            # The log opens after every check, so that a refused resume leaves the run folder as it was; what
            # the checks noted is logged now, into train.log.
            self.runlog.open(self.step if resumed else None)
            if main and resumed:
                log.info("resumed from %s at step %d", self.ckpt.latest(), self.step)
            elif main and resume:
                log.info("no checkpoint in %s: starting from step 0", self.ckpt.root)
            if main and resumed:
                for level, message in self.notes:
                    log.log(level, "%s", message)
            if main:
                self._log_start()
            if resumed and self.step >= self.total_steps:
                done = self._finished_summary()
                if done is not None:  # nothing left to do: the run's files stay as the run wrote them
                    log.info("%s finished at step %d already; nothing to do", self.run_dir, self.step)
                    summary, finished = done, True
                    return summary
            if main:
                with naming(self.run_dir / "config.yaml"):
                    write_bytes_atomic(self.run_dir / "config.yaml", dump_config(cfg).encode())
                self._log_training_labels()
            self.model.train()
            batches = self._batches()  # after resume(): it starts at self.step
            bar = tqdm(total=self.total_steps, initial=self.step, disable=not main, desc="train", dynamic_ncols=True)
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            count, busy, waiting = 0, 0.0, 0.0
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                batch = self._to_device(next(batches))
                t1 = time.perf_counter()
                loss, logs = self.train_step(batch)
                for key, value in {"loss": float(loss), **logs}.items():
                    sums[key] = sums.get(key, 0.0) + float(value)
                    counts[key] = counts.get(key, 0) + 1
                count, waiting, busy = count + 1, waiting + t1 - t0, busy + time.perf_counter() - t0
                bar.update(1)
                if self.step % t_cfg["log_every"] == 0 or self.step == self.total_steps:
                    summary = {"step": self.step, **self._mean_over_ranks(sums, counts),
                               "lr": self.scheduler.get_last_lr()[0],
                               "images_per_s": count * self.sampler.global_batch / busy,
                               "data_wait": waiting / busy}  # share of the step time spent waiting for data
                    bar.set_postfix(loss=f"{summary['loss']:.4f}")
                    self.runlog.scalars(self.step, summary)
                    sums, counts, count, busy, waiting = {}, {}, 0, 0.0, 0.0
                if t_cfg["ckpt_every"] and self.step % t_cfg["ckpt_every"] == 0 and self.step < self.total_steps:
                    self._save()
                val_every = cfg["val"]["every"]
                if val_every and self.step % val_every == 0 and self.step < self.total_steps:
                    summary["val"] = self.validate()
            self._save()
            if cfg["val"]["every"]:
                summary["val"] = self.validate()
            if main:
                save(self.run_dir / MODEL_FILE, self.model, self.spec)
                with naming(self.run_dir / "summary.json"):
                    write_bytes_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2).encode())
            finished = True
        finally:
            if batches is not None:
                batches.close()  # stops the data workers now
            if bar is not None:
                bar.close()
            self.runlog.close()
            # DDP's reducer holds the process group; free it first, so that no gloo/NCCL object outlives the group
            # and dies during interpreter shutdown (an abort).
            self.ddp = self.model
            shutdown(self.dist, synchronize=finished)
        return summary

    def _log_start(self) -> None:
        """Say where the run writes and what it trains on, first thing (console and ``train.log``)."""
        data = self.cfg["data"]
        split = f"split {data['split']!r}" if data["split"] else "every labelled image"
        masks = f", masks from {data['mask_dir']}" if data["mask_dir"] else ""
        val = (f"; validating on {len(self.val_dataset)} images of {self.cfg['val']['split']!r} every "
               f"{self.cfg['val']['every']} steps" if self.val_dataset is not None else "")
        log.info("run folder %s: %d training images (%s of %s%s, %d classes), steps %d to %d, global batch %d%s",
                 self.run_dir.resolve(), len(self.dataset), split, data["root"], masks, self.classes.num_classes,
                 self.step, self.total_steps, self.sampler.global_batch, val)

    def _finished_summary(self) -> dict[str, Any] | None:
        """The saved ``summary.json`` of a run that already reached ``train.steps`` and wrote its final model (None
        when it did not: it was killed after its last checkpoint, and the end of :meth:`fit` still has to run).
        Rank 0 reads it for every process."""
        summary = None
        if self.dist.is_main and (self.run_dir / MODEL_FILE).is_file():
            path = self.run_dir / "summary.json"
            try:
                summary = json.loads(path.read_text())
            except (OSError, ValueError):  # missing or cut short: written again at the end of fit()
                summary = None
            if not isinstance(summary, dict):
                summary = None
        return all_gather_objects(summary, self.dist)[0]

    def _log_training_labels(self) -> None:
        """A training run on other masks than the dataset's (pseudo labels, ``data.mask_dir``) shows TensorBoard
        the first ``val.images`` of them beside the true masks, at the start."""
        data, count = self.cfg["data"], self.cfg["val"]["images"]
        if not (self.runlog.wants_images and data["mask_dir"] and count):
            return
        own = VOCDataset(data["root"], data["split"], labels_file=data["labels_file"], require_labels=False,
                         background=data["background"])
        indices = range(min(count, len(own)))
        self.runlog.image("train/pseudo_labels", self.step, labels_grid(own, {"pseudo label": data["mask_dir"]},
                                                                        indices))

    def _save(self) -> None:
        state = self.state()  # every rank takes part (RNG states are gathered)
        if self.dist.is_main:
            self.ckpt.save(self.step, self.model, self.spec, state)
        barrier(self.dist)

    # --------------------------------------------------------------------------------------------- validate

    def validate(self) -> dict[str, Any]:
        """``val.metric`` on ``val.split``, each process taking every world_size-th image: the mIoU of the
        ``val.method`` maps (confusion counts summed over processes; rank 0 logs a picture grid in TensorBoard), or
        the classifier's mAP. With ``val.keep_best`` rank 0 writes ``model_best.safetensors`` when it improves."""
        v = self.cfg["val"]
        dataset = self.val_dataset
        if dataset is None:  # validate() called directly, with val.every = 0
            dataset = VOCDataset(self.cfg["data"]["root"], v["split"], require_masks=v["metric"] == "miou")
        n = len(dataset) if v["limit"] is None else min(v["limit"], len(dataset))
        result = self._validate_map(dataset, n) if v["metric"] == "map" else self._validate_miou(dataset, n)
        self.model.train()
        value = result[v["metric"]]
        if v["keep_best"] and (self.best_val is None or value > self.best_val):
            self.best_val = value
            if self.dist.is_main:
                save(self.run_dir / BEST_MODEL_FILE, self.model, self.spec)
                log.info("step %d: val %s %.4f, the best so far: wrote %s", self.step, v["metric"], value,
                         self.run_dir / BEST_MODEL_FILE)
        result["best"] = self.best_val
        return result

    @torch.no_grad()
    def _validate_map(self, dataset: VOCDataset, n: int) -> dict[str, Any]:
        """Per-image mAP of the logits on timm's eval view (short side crop / 0.875, centre crop), as MCTformer."""
        crop = self.cfg["data"]["transforms"].get("crop") or 224
        side = crop if isinstance(crop, int) else min(crop)
        view = Compose([ToTensor(), Resize(int(side / 0.875), self.cfg["data"]["transforms"]["interpolation"]),
                        CenterCrop(crop), Normalize(self.mean, self.std)])
        self.model.eval()
        labels, scores = [], []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for i in range(self.dist.rank, n, self.dist.world_size):
                image, _ = view(dataset.load_image(i))
                scores.append(torch.sigmoid(self.model(image[None].to(self.device)))[0].float().cpu().numpy())
                labels.append(dataset.labels(i))
        labels = [x for part in all_gather_objects(labels, self.dist) for x in part]
        scores = [x for part in all_gather_objects(scores, self.dist) for x in part]
        result = {"map": mean_average_precision(np.stack(labels), np.stack(scores)), "num_images": len(labels)}
        self.runlog.scalars(self.step, {"val_map": result["map"], "val_images": result["num_images"]})
        return result

    def _validate_miou(self, dataset: VOCDataset, n: int) -> dict[str, Any]:
        v = self.cfg["val"]
        rank, world = self.dist.rank, self.dist.world_size
        options = dict(method=v["method"], scales=v["scales"], square_sizes=v["square_sizes"], flip=v["flip"],
                       device=self.device, mean=self.mean, std=self.std)
        # Validation must not move the training RNG streams (a resumed run does not repeat it).
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            sweep = maps_sweep(self.model, dataset, thresholds=v["thresholds"], indices=range(rank, n, world),
                               **options)
            if self.dist.enabled:
                sweep.all_reduce()
            result = sweep_result(sweep, dataset)
            if self.runlog.wants_images and v["images"]:
                grid = map_grid(self.model, dataset, range(min(v["images"], n)), threshold=result["threshold"],
                                **options)
                self.runlog.image(f"val/{v['method']}", self.step, grid)
        self.runlog.scalars(self.step, {"val_miou": result["miou"], "val_threshold": result["threshold"],
                                        "val_images": result["num_images"]})
        return result


def _with_current_defaults(old: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config completed with the defaults of keys added since it was written (so a new option left
    at its default is not a change); as it is where it no longer validates (a key since removed is a change)."""
    try:
        return validate_config(old)
    except ConfigError:
        return old

