"""The training engine shared by every objective: data, model, optimiser, checkpoints, resume, DDP, logging.

One step = one global batch. ``torchrun`` processes shard each global batch (see :mod:`.sampler`), gradients are
averaged by DDP, only rank 0 writes. A resumed run restores model, optimiser, scheduler, step and RNG states and
continues the data order where it stopped, so it ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.transforms import build_transforms
from ..data.voc import VOCDataset, collate
from ..errors import ConfigError, WSSSError
from ..models import create_model
from .checkpoint import CheckpointManager, model_spec, save_model
from .config import dump_config
from .distributed import DistInfo, all_reduce_mean, barrier, init_distributed, shutdown
from .objectives import build_objective
from .optim import build_optimizer, build_scheduler
from .sampler import ResumableBatchSampler
from .validate import maps_miou

log = logging.getLogger("wsss.train")


class TrainingDiverged(WSSSError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for, but no CUDA device is available")
    return torch.device(name)


class Trainer:
    """Builds everything from a config (see :mod:`.config`) and runs the loop."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        if not cfg["data"]["root"]:
            raise ConfigError("data.root is not set (give data.root=PATH)")
        self.device = pick_device(cfg["device"])
        self.dist: DistInfo = init_distributed(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        self.run_dir = Path(cfg["run_dir"])
        torch.manual_seed(cfg["seed"] + self.dist.rank)
        data = cfg["data"]
        self.dataset = VOCDataset(data["root"], data["split"], transform=build_transforms(data["transforms"]),
                                  min_label_fraction=data["min_label_fraction"], seed=cfg["seed"])
        self.classes = self.dataset.classes
        self.sampler = ResumableBatchSampler(len(self.dataset), data["batch_size"], cfg["seed"], self.dist.rank,
                                             self.dist.world_size)
        m = cfg["model"]
        self.model = create_model(m["name"], weights=m["weights"], num_classes=self.classes.num_fg, head=m["head"],
                                  pool=m["pool"], drop_path_rate=m["drop_path_rate"]).to(self.device)
        self.spec = model_spec(self.model, m["name"], {"classes": list(self.classes.names)})
        self.objective = build_objective(cfg["method"], classes=self.classes, device=self.device,
                                         mean=data["transforms"].get("mean", [0.5] * 3),
                                         std=data["transforms"].get("std", [0.5] * 3))
        self.ddp = (nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
                    if self.dist.enabled else self.model)
        self.total_steps = cfg["train"]["steps"]
        self.optimizer = build_optimizer(self.model, cfg["optim"])
        self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg["optim"])
        self.ckpt = CheckpointManager(self.run_dir, keep=cfg["train"]["keep_checkpoints"])
        self.step = 0
        self.writer = None

    # ------------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def resume(self) -> bool:
        """Restore the newest checkpoint of the run folder; False when there is none."""
        path = self.ckpt.latest()
        if path is None:
            return False
        from ..models import load_into
        from ..models.weights import load_state_dict

        load_into(self.model, load_state_dict(path / "model.safetensors"), source=str(path))
        state = self.ckpt.load_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------------ loop

    def _batches(self):
        """Global batches from the current step on, across epoch boundaries, in a resumable order."""
        per_epoch = self.sampler.batches_per_epoch
        epoch, offset = divmod(self.step, per_epoch)
        data = self.cfg["data"]
        while True:
            self.sampler.set_position(epoch, offset)
            self.dataset.set_epoch(epoch)  # workers fork at iter(), so they see this epoch
            loader = DataLoader(self.dataset, batch_sampler=self.sampler, num_workers=data["num_workers"],
                                collate_fn=collate, pin_memory=self.device.type == "cuda")
            yield from loader
            epoch, offset = epoch + 1, 0

    def _autocast(self):
        if self.cfg["train"]["amp"] and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _open_writer(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard is an optional extra
            return
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to ``train.steps``; returns the last logged scalars (and validation results)."""
        cfg, main = self.cfg, self.dist.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            self._setup_logging()
            self._open_writer()
        if resume:
            self.resume()
        self.model.train()
        t_cfg = cfg["train"]
        summary: dict[str, Any] = {}
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not main, desc="train", dynamic_ncols=True)
        batches = self._batches()
        t0, step0 = time.perf_counter(), self.step
        try:
            while self.step < self.total_steps:
                batch = next(batches)
                batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                with self._autocast():
                    loss, logs = self.objective(self.ddp, batch, self.step)
                loss_all = all_reduce_mean(loss.detach().float(), self.dist)
                if not math.isfinite(float(loss_all)):
                    raise TrainingDiverged(
                        f"loss is {float(loss_all)} at step {self.step} ({logs}); the last good checkpoint in "
                        f"{self.ckpt.root} is kept; lower optim.lr or enable train.grad_clip")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if t_cfg["grad_clip"]:
                    nn.utils.clip_grad_norm_(self.model.parameters(), t_cfg["grad_clip"])
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                bar.update(1)
                if self.step % t_cfg["log_every"] == 0 or self.step == self.total_steps:
                    summary = {"step": self.step, "loss": float(loss_all), "lr": self.scheduler.get_last_lr()[0],
                               **logs,
                               "images_per_s": (self.step - step0) * self.sampler.global_batch / (time.perf_counter() - t0)}
                    bar.set_postfix(loss=f"{float(loss_all):.4f}")
                    if main:
                        self._log(summary)
                if t_cfg["ckpt_every"] and self.step % t_cfg["ckpt_every"] == 0 and self.step < self.total_steps:
                    self._save()
                val_every = cfg["val"]["every"]
                if val_every and self.step % val_every == 0 and self.step < self.total_steps:
                    summary["val"] = self.validate()
            self._save()
            if cfg["val"]["every"]:
                summary["val"] = self.validate()
            if main:
                save_model(self.run_dir / "model.safetensors", self.model, self.spec)
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        finally:
            bar.close()
            if self.writer is not None:
                self.writer.close()
            shutdown(self.dist)
        return summary

    def _save(self) -> None:
        if self.dist.is_main:
            self.ckpt.save(self.step, self.model, self.spec, self.state())
        barrier(self.dist)

    def validate(self) -> dict[str, Any]:
        """mIoU of the maps on ``val.split`` (rank 0 computes it; it is cheap next to training)."""
        v = self.cfg["val"]
        result: dict[str, Any] = {}
        if self.dist.is_main:
            t = self.cfg["data"]["transforms"]
            dataset = VOCDataset(self.cfg["data"]["root"], v["split"])
            result = maps_miou(self.model, dataset, v["method"], v["scales"], v["flip"], v["thresholds"], v["limit"],
                               device=self.device, mean=t.get("mean", [0.5] * 3), std=t.get("std", [0.5] * 3))
            self.model.train()
            self._log({"step": self.step, "val_miou": result["miou"], "val_threshold": result["threshold"]})
        barrier(self.dist)
        return result

    def _setup_logging(self) -> None:
        handler = logging.FileHandler(self.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)

    def _log(self, scalars: dict[str, Any]) -> None:
        line = json.dumps({k: v for k, v in scalars.items() if not isinstance(v, dict)})
        log.info(line)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(line + "\n")
        if self.writer is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self.writer.add_scalar(k, v, self.step)
