"""Split inference at scale (issue "scale"): batched `wsss cam` against one image at a time, compact maps against
full ones, ranks under torchrun, and the hours a whole dataset would take.

On one split (MSRC val by default) with one classifier run it times, in this process:
  per-image   `wsss cam --batch-size 1 --workers 0 --map-resolution full` (the path before batching);
  batched     `wsss cam --batch-size B` (images grouped by size) at full resolution, and compact;
  ranks       optionally, `torchrun --nproc_per_node N -m wsss.cli.main cam ...` (gloo on the CPU);
checks that the batched maps equal the per-image ones, measures the disk of full and compact maps and scores both
with the background sweep of `wsss eval`, and projects hours for VOC train_aug and COCO train from the measured
images/s (marked as projected from this device: a linear extrapolation, not a measurement).

    python benchmarks/split_inference.py --checkpoint RUN [--data ROOT --split val --method getam --ranks 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import RESULTS_DIR, environment, markdown_table, shared_data_dir, write_json
from wsss.cli.main import main as wsss
from wsss.data.io import load_maps
from wsss.evaluate.split import evaluate_split, read_split_ids

REPO = Path(__file__).resolve().parents[1]
DATASETS = {"VOC train_aug": 10582, "COCO train": 82783}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _npz_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.npz"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a classifier run folder or model.safetensors")
    parser.add_argument("--data", default=None, help="VOC-layout root (default: the shared MSRC)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--method", default="getam")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", type=int, default=0, help="also time a torchrun job of this many ranks")
    parser.add_argument("--out", default=str(RESULTS_DIR / "split_inference_msrc.json"))
    args = parser.parse_args()
    data = Path(args.data) if args.data else shared_data_dir() / "msrc"
    images = len(read_split_ids(data, args.split))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = ["cam", "--checkpoint", args.checkpoint, "--data", str(data), "--split", args.split, "--method",
                args.method, "--device", args.device]
        runs = {
            "per-image": ["--batch-size", "1", "--workers", "0", "--map-resolution", "full"],
            "batched": ["--batch-size", str(args.batch_size), "--workers", str(args.workers), "--map-resolution",
                        "full"],
            "batched compact": ["--batch-size", str(args.batch_size), "--workers", str(args.workers)],
        }
        seconds = {}
        for name, extra in runs.items():
            start = time.perf_counter()
            assert wsss([*base, "--out", str(tmp / name), *extra]) == 0
            seconds[name] = time.perf_counter() - start
        if args.ranks > 1:
            env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1)
                                                                                            // args.ranks))}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "wsss.cli.main",
                   *base, "--out", str(tmp / "ranks"), "--batch-size", str(args.batch_size)]
            start = time.perf_counter()
            subprocess.run(cmd, env=env, check=True, capture_output=True)
            seconds[f"{args.ranks} ranks compact"] = time.perf_counter() - start  # includes the ranks' start-up

        worst = 0.0
        for image_id in read_split_ids(data, args.split):
            a, _ = load_maps(tmp / "per-image" / f"{image_id}.npz")
            b, _ = load_maps(tmp / "batched" / f"{image_id}.npz")
            worst = max(worst, float(np.abs(a - b).max()))
        disk = {name: _npz_bytes(tmp / name) for name in ("batched", "batched compact")}
        scores = {name: evaluate_split(data, args.split, tmp / name, sweep=True, progress=False)
                  for name in ("batched", "batched compact")}

    rows, result_runs = [], {}
    for name, s in seconds.items():
        rate = images / s
        result_runs[name] = {"seconds": s, "images_per_s": rate, "speedup_over_per_image": seconds["per-image"] / s}
        rows.append([name, f"{s:.1f}", f"{rate:.2f}", f"{seconds['per-image'] / s:.2f}x"])
    print(f"{args.method} maps of {images} images ({data.name} {args.split}), {args.device}, "
          f"{torch.get_num_threads()} threads; wall seconds include loading the model")
    print(markdown_table(["run", "s", "images/s", "vs per-image"], rows))
    print(f"batched vs per-image maps: max |diff| {worst:.2e} (both stored as float16)")
    print(markdown_table(["maps", "disk MiB", "mIoU (sweep)", "threshold"],
                         [[k, f"{disk[k] / 2**20:.2f}", f"{100 * scores[k]['miou']:.2f}", scores[k]["threshold"]]
                          for k in disk]))
    rate = result_runs["batched compact"]["images_per_s"]
    projection = {name: {f"{d} device{'s' if d > 1 else ''}": n / (rate * d) / 3600 for d in (1, 8)}
                  for name, n in DATASETS.items()}
    print(f"projected hours at {rate:.2f} images/s per device (linear in devices; projected from {args.device}, "
          "not measured there):")
    print(markdown_table(["dataset", "images", "1 device", "8 devices"],
                         [[k, DATASETS[k], *(f"{v:.2f}" for v in projection[k].values())] for k in projection]))
    write_json(args.out, {
        "benchmark": "split_inference", "environment": environment(args.device),
        "settings": {"data": str(data), "split": args.split, "images": images, "method": args.method,
                     "checkpoint": args.checkpoint, "batch_size": args.batch_size, "workers": args.workers,
                     "ranks": args.ranks},
        "runs": result_runs, "batched_vs_per_image_max_abs_diff": worst,
        "disk_bytes": disk, "compact_over_full_disk": disk["batched compact"] / disk["batched"],
        "miou": {k: scores[k]["miou"] for k in scores},
        "projected_hours": {"from": f"{args.device}, measured images/s of 'batched compact'", **projection}})


if __name__ == "__main__":
    main()
