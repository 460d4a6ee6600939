"""Data parallelism: the sampler's sharding, and a 2-process gloo run on loopback against a 1-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wsss.data.synth import make_synthetic
from wsss.train import Trainer, load_config
from wsss.train.config import dump_config
from wsss.train.distributed import DistInfo, all_gather_objects, all_reduce_mean
from wsss.train.sampler import ResumableBatchSampler

REPO = Path(__file__).resolve().parents[1]


def test_ranks_split_each_global_batch_like_one_process():
    single = list(ResumableBatchSampler(22, 6, seed=3))
    shards = [list(ResumableBatchSampler(22, 2, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert len(single) == 3  # 22 // 6, the partial batch dropped
    for i, batch in enumerate(single):
        assert sum((shard[i] for shard in shards), []) == batch
    # An epoch is a permutation: no sample twice, 18 of the 22 used.
    flat = sum(single, [])
    assert len(set(flat)) == 18 and set(flat) <= set(range(22))


def test_sampler_resumes_inside_an_epoch_and_reshuffles_each_epoch():
    sampler = ResumableBatchSampler(20, 4, seed=0)
    sampler.set_position(1)
    epoch1 = list(sampler)
    sampler.set_position(1, 3)
    assert len(sampler) == 2 and list(sampler) == epoch1[3:]
    sampler.set_position(0)
    assert list(sampler) != epoch1
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(5, 3, seed=0, world_size=2)


def test_collectives_are_identities_for_one_process():
    alone = DistInfo()
    value = torch.tensor([1.5, -2.0])
    assert torch.equal(all_reduce_mean(value, alone), value)
    assert all_gather_objects({"a": 1}, alone) == [{"a": 1}]
    assert not alone.enabled and alone.is_main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def files(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir).parent if p.parent.name == "tb" else p.relative_to(run_dir))
                  for p in run_dir.rglob("*") if p.is_file())


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """torchrun, 2 CPU processes x batch 2 against 1 process x batch 4, over an epoch boundary: same weights, same
    logged losses (averaged over the ranks), validation sharded and merged, and only rank 0 writes."""
    root = make_synthetic(tmp_path / "data", num_train=24, num_val=4, size=32)
    common = [f"data.root={root}", "device=cpu", "model.name=vit_nano_patch16", "data.num_workers=0",
              "data.transforms={crop: 32, scale: [0.5, 1.0], hflip: true}", "optim.name=sgd", "optim.lr=0.05",
              "optim.weight_decay=1e-4", "train.steps=8", "train.log_every=2", "train.ckpt_every=4", "val.every=8",
              "val.thresholds=[0.0, 1.0, 0.05]", "val.images=0"]
    ddp_cfg = load_config(None, common + [f"run_dir={tmp_path / 'ddp'}", "data.batch_size=2"])
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(dump_config(ddp_cfg))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "wsss.cli.main", "train", "--config", str(config_file)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        single = Trainer(load_config(None, common + [f"run_dir={tmp_path / 'one'}", "data.batch_size=4"])).fit()
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    one, ddp = tmp_path / "one", tmp_path / "ddp"

    final_one, final_ddp = load_file(str(one / "model.safetensors")), load_file(str(ddp / "model.safetensors"))
    assert final_one.keys() == final_ddp.keys()
    for key in final_one:
        torch.testing.assert_close(final_ddp[key], final_one[key], atol=1e-5, rtol=0, msg=key)
    start = load_file(str(one / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert (final_one["head.weight"] - start["head.weight"]).abs().max() > 1e-3  # the weights did move

    # Logged numbers are means over the ranks, so they equal the single process's batch means.
    lines_one, lines_ddp = metric_lines(one), metric_lines(ddp)
    assert [m["step"] for m in lines_ddp] == [m["step"] for m in lines_one] == [2, 4, 6, 8, 8]
    for a, b in zip(lines_one[:-1], lines_ddp[:-1]):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["cls"] == pytest.approx(a["cls"], abs=1e-5)
    # Each rank validated 2 of the 4 images; the merged counts cover all 4.
    assert lines_ddp[-1]["val_images"] == 4
    assert lines_ddp[-1]["val_miou"] == pytest.approx(lines_one[-1]["val_miou"], abs=0.02)
    assert single["val"]["num_images"] == 4

    # Only rank 0 wrote: the same files as the single run, one event file, one summary on stdout.
    assert files(ddp) == files(one)
    if (one / "tb").is_dir():  # TensorBoard is an optional extra
        assert len(list((ddp / "tb").iterdir())) == 1
    assert out.count("val mIoU of the cam maps") == 1
    # Both ranks' random states are in the checkpoint, and they differ (rank r is seeded with seed + r).
    state = torch.load(ddp / "checkpoints" / "step_0000008" / "state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
