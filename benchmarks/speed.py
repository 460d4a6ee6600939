"""Speed and memory of the localisation maps on the shared ViT-Ti (issue "speed").

For each input size and batch size it measures, per image:
  (a) a forward pass (no attention capture), next to a plain ``scaled_dot_product_attention`` ViT written below;
  (b) one forward + backward of one class score per image into every parameter (a training-like step);
  (c) GETAM / ACR maps for K classes per image with ``wsss.localize`` (one batched backward, no parameter
      gradients, stopped at the first block the map reads);
  (d) the same maps the way the authors compute them: attention saved with a tensor hook, then for each image and
      each class ``model.zero_grad(); score.backward(retain_graph=True)`` through every block into every parameter.
(d) is checked against (c) (max abs difference of the normalised maps). Every timed call also records its peak
memory (see ``common.peak_memory_mib``). Then the ``wsss eval`` streaming rate (``evaluate_split`` on synthetic
500x375 masks) and the training throughput of ``wsss train`` against a bare loop.

    python benchmarks/speed.py --threads 1            # the full CPU run (about 10 minutes)
    python benchmarks/speed.py --quick                # a smoke run
    python benchmarks/speed.py --device cuda --bf16 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common import (CLOCKS, RESULTS_DIR, VIT_TINY, environment, load_vit_tiny, markdown_table, measure,
                    set_threads, shared_data_dir, synchronize, timed_call, write_json)
from wsss.localize import localize
from wsss.models import Capture

METHODS = ("getam", "acr")
TARGETS = {"getam_k10": 3.0, "getam_k1": 2.0, "forward_overhead": 0.10, "memory_448_k20_mib": 2048.0,
           "eval_masks_per_s": 200.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 448])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 5, 10, 20], help="classes per image")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeat", type=int, default=2, help="timed rounds per measurement")
    parser.add_argument("--forward-repeat", type=int, default=10,
                        help="timed rounds of (a) and the plain forward (cheap, and their ratio is a target)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed rounds")
    parser.add_argument("--loop-budget", type=float, default=30.0,
                        help="skip a (d) measurement whose estimated total time exceeds this many seconds; its "
                             "per-image time is then estimated from batch 1 (the loop's cost per image does not "
                             "depend on the batch)")
    parser.add_argument("--max-work", type=float, default=160,
                        help="skip (c) and (d) where batch x K x (size/224)^2 exceeds this (default: 448 batch 8 "
                             "stops at K=5, which already takes minutes and GiBs on a CPU)")
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="what the tables show: wall time, or process CPU time (with --threads 1 the stable "
                             "measure of the work on a shared machine); the JSON keeps both")
    parser.add_argument("--bf16", action="store_true", help="run every timed call under bfloat16 autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model for the forward timings (a)")
    parser.add_argument("--no-eval", action="store_true", help="skip the wsss eval streaming measurement")
    parser.add_argument("--eval-images", type=int, default=300)
    parser.add_argument("--no-train", action="store_true", help="skip the training-throughput measurement")
    parser.add_argument("--train-steps", type=int, default=12)
    parser.add_argument("--profile", default=None, metavar="METHOD,SIZE,BATCH,K",
                        help="also profile (c) and (d) of one configuration with torch.profiler, e.g. getam,224,1,10")
    parser.add_argument("--quick", action="store_true", help="smoke run: 224, batch 1, K 1 and 5, one round")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "speed.json")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu only makes sense on the CPU")
    if args.quick:
        args.sizes, args.batches, args.ks, args.repeat, args.forward_repeat = [224], [1], [1, 5], 1, 3
        args.eval_images, args.train_steps = 60, 4
    return args


# ------------------------------------------------------------------------------------------------ plain SDPA ViT


class PlainViT:
    """A minimal ViT forward from a timm-style state dict with ``F.scaled_dot_product_attention``.

    Written independently of ``wsss.models``; it is the speed yardstick for the library's forward pass.
    """

    def __init__(self, state: dict[str, Tensor], num_heads: int, patch: int, eps: float = 1e-6):
        self.s = state
        self.heads = num_heads
        self.patch = patch
        self.eps = eps
        self.depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))

    def pos_embed(self, grid: tuple[int, int]) -> Tensor:
        pos = self.s["pos_embed"]
        side = math.isqrt(pos.shape[1] - 1)
        if grid == (side, side):
            return pos
        patches = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False, antialias=True)
        return torch.cat([pos[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)

    def __call__(self, x: Tensor) -> Tensor:
        s = self.s
        x = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=self.patch)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([s["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed(grid)
        b, t, d = x.shape
        for i in range(self.depth):
            p = f"blocks.{i}."
            h = F.layer_norm(x, (d,), s[p + "norm1.weight"], s[p + "norm1.bias"], self.eps)
            q, k, v = F.linear(h, s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"]).view(
                b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
            x = x + F.linear(h, s[p + "attn.proj.weight"], s[p + "attn.proj.bias"])
            h = F.layer_norm(x, (d,), s[p + "norm2.weight"], s[p + "norm2.bias"], self.eps)
            h = F.gelu(F.linear(h, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"]))
            x = x + F.linear(h, s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"])
        x = F.layer_norm(x[:, 0], (d,), s["norm.weight"], s["norm.bias"], self.eps)
        return F.linear(x, s["head.weight"], s["head.bias"])


# ------------------------------------------------------------------------------------------------ authors' loop


def _save_grad(store: dict[int, Tensor], layer: int, grad: Tensor) -> None:
    store[layer] = grad


def authors_maps(model: torch.nn.Module, images: Tensor, classes: Tensor, method: str,
                 start_layer: int | None = None) -> Tensor:
    """GETAM / ACR maps ``(B, K, H, W)`` computed as the authors do: one backward per (image, class).

    Each image gets its own forward pass with attention capture; a hook on every block's attention saves its
    gradient; each class score is backpropagated with ``retain_graph=True`` after ``model.zero_grad()``, through all
    blocks and into every parameter (they require grad, as in the authors' training code). Maps are upsampled
    bilinearly (align_corners=True) and min-max normalised, as ``wsss.localize`` does.
    """
    depth = model.depth
    first = (depth // 2 if method == "getam" else depth - 2) if start_layer is None else start_layer
    maps = []
    for b in range(images.shape[0]):
        grads: dict[int, Tensor] = {}
        out = model(images[b : b + 1], capture=Capture(attn=True))
        for layer, a in enumerate(out.attn):
            a.register_hook(functools.partial(_save_grad, grads, layer))
        p = out.num_prefix
        rows = []
        for c in classes[b].tolist():
            model.zero_grad()
            out.logits[0, c].backward(retain_graph=True)
            if method == "getam":
                acc = sum((grads[l][0] * out.attn[l][0].detach()).clamp(min=0).mean(0)
                          * grads[l][0].clamp(min=0).mean(0) for l in range(first, depth))
                rows.append(acc[0, p:].clamp(min=0))
            else:  # acr: class-token gradient alone, refined by the summed head-mean patch affinity
                acc = sum(grads[l][0].clamp(min=0).mean(0) for l in range(first, depth))
                affinity = sum(a[0].detach().mean(0)[p:, p:] for a in out.attn)
                rows.append(affinity @ acc[0, p:].clamp(min=0))
        maps.append(torch.stack(rows).reshape(1, len(rows), *out.grid))
    up = F.interpolate(torch.cat(maps), size=images.shape[-2:], mode="bilinear", align_corners=True)
    lo = up.amin(dim=(2, 3), keepdim=True)
    hi = up.amax(dim=(2, 3), keepdim=True)
    return (up - lo) / (hi - lo + 1e-6)


# ------------------------------------------------------------------------------------------------ measuring


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{1000 * seconds:.1f}"


def mib(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den == 0 else num / den


def fmt_ratio(value: float | None, prefix: str = "") -> str:
    return "—" if value is None else f"{prefix}{value:.2f}"


# ------------------------------------------------------------------------------------------------ sections


def bench_base(model, plain: PlainViT, x: Tensor, classes: Tensor, args, amp) -> dict[str, Any]:
    """(a) forward, plain SDPA forward and (b) forward + backward, per image."""
    fwd_model = torch.compile(model) if args.compile else model
    fwd_plain = torch.compile(plain.__call__) if args.compile else plain

    def forward() -> None:
        with torch.inference_mode():
            fwd_model(x)

    def forward_plain() -> None:
        with torch.inference_mode():
            fwd_plain(x)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        model(x).gather(1, classes[:, :1]).sum().backward()

    warm = {"forward": args.warmup, "plain_sdpa": args.warmup, "forward_backward": args.warmup}
    res = measure({"forward": forward, "plain_sdpa": forward_plain}, args.forward_repeat, warm, args.device, amp)
    res.update(measure({"forward_backward": forward_backward}, args.repeat, warm, args.device, amp))
    model.zero_grad(set_to_none=True)
    b = x.shape[0]
    return {n: {**t.as_dict(b, args.clock), "peak_mib": p} for n, (t, p) in res.items()}


def bench_maps(model, x: Tensor, classes: Tensor, method: str, k: int, loop_b1: tuple[float, float] | None, args,
               amp, first_k: bool) -> dict[str, Any]:
    """(c) ours and (d) the authors' loop for K classes per image; (d) skipped beyond the time budget.

    ``loop_b1``: (d)'s batch-1 seconds per image at this size and K, by the chosen clock and by the wall clock.
    """
    b = x.shape[0]
    cls = classes[:, :k]
    ours = {}

    def run_ours() -> None:
        ours["maps"] = localize(model, x, cls, method=method)

    loop = {}

    def run_loop() -> None:
        loop["maps"] = authors_maps(model, x, cls, method)

    calls = {"ours": run_ours}
    estimate = None if loop_b1 is None else loop_b1[1] * b * (args.repeat + (1 if first_k else 0))
    run_the_loop = estimate is None or estimate <= args.loop_budget
    if run_the_loop:
        calls["loop"] = run_loop
    warm = {"ours": args.warmup, "loop": args.warmup if first_k else 0}  # K = 1 already warmed the loop's shapes
    res = measure(calls, args.repeat, warm, args.device, amp)
    model.zero_grad(set_to_none=True)
    row: dict[str, Any] = {"ours": {**res["ours"][0].as_dict(b, args.clock), "peak_mib": res["ours"][1]}}
    if run_the_loop:
        row["loop"] = {**res["loop"][0].as_dict(b, args.clock), "peak_mib": res["loop"][1]}
        row["max_abs_diff"] = float((ours["maps"].float() - loop["maps"].float()).abs().max())
    else:
        row["loop"] = {"skipped": f"estimated {estimate:.0f} s > --loop-budget {args.loop_budget:.0f} s",
                       "estimated_best_s": loop_b1[0]}
    return row


def synthetic_masks(n: int, height: int, width: int, num_classes: int, seed: int = 0):
    """Ground-truth / prediction pairs of blob-shaped label maps with 255 borders (like VOC's)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(n):
        gt = np.zeros((height, width), dtype=np.uint8)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(30, height / 2), rng.uniform(30, width / 2)
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            label = rng.integers(1, num_classes)
            gt[(inside <= 1.0) & (inside > 0.92)] = 255
            gt[inside <= 0.92] = label
        pred = np.roll(gt, shift=(int(rng.integers(-12, 12)), int(rng.integers(-12, 12))), axis=(0, 1))
        pred = np.where(pred == 255, 0, pred).astype(np.uint8)
        yield gt, pred


def bench_eval(n: int) -> dict[str, Any] | str:
    """Masks per second of ``evaluate_split`` on ``n`` synthetic 500x375 label PNGs (predictions also PNGs)."""
    if importlib.util.find_spec("wsss.evaluate") is None:
        return "skipped: wsss.evaluate is not there"
    import wsss.evaluate as ev
    if not hasattr(ev, "evaluate_split"):
        return "skipped: wsss.evaluate has no evaluate_split"
    from wsss.data.io import write_mask

    num_classes = 21
    with tempfile.TemporaryDirectory(prefix="wsss_eval_bench_") as tmp:
        root, pred = Path(tmp) / "data", Path(tmp) / "pred"
        (root / "ImageSets" / "Segmentation").mkdir(parents=True)
        (root / "classes.txt").write_text("\n".join(["background"] + [f"c{i}" for i in range(1, num_classes)]))
        ids = [f"img{i:04d}" for i in range(n)]
        (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
        for image_id, (gt, p) in zip(ids, synthetic_masks(n, 375, 500, num_classes)):
            write_mask(root / "SegmentationClass" / f"{image_id}.png", gt)
            write_mask(pred / f"{image_id}.png", p)
        result = {}
        for workers in (0, 2):
            metrics: dict[str, Any] = {}
            wall, cpu = timed_call(lambda: metrics.update(
                ev.evaluate_split(root, "val", pred, num_workers=workers, progress=False)))
            result[f"workers_{workers}"] = {"seconds": wall, "masks_per_s": n / wall, "cpu_seconds": cpu,
                                            "masks_per_cpu_s": n / cpu, "miou": metrics["miou"]}
    return result


def bench_training(args) -> dict[str, Any] | str:
    """Images per second of ``wsss train`` (the Trainer) against a bare loop with the same model and batch."""
    if importlib.util.find_spec("wsss.train.engine") is None:
        return "skipped: the training engine (src/wsss/train/) is not there yet"
    from wsss.train import Trainer, load_config

    horses = shared_data_dir() / "horses"
    weights = shared_data_dir() / "weights" / "vit_tiny_patch16_224_in1k.safetensors"
    batch, steps = 8, args.train_steps
    with tempfile.TemporaryDirectory(prefix="wsss_train_bench_") as tmp:
        cfg = load_config(None, [f"data.root={horses}", "data.split=all", f"data.batch_size={batch}",
                                 f"model.weights={weights}", f"run_dir={tmp}/run", f"device={args.device}",
                                 f"train.steps={steps}", f"train.log_every={steps}", "train.ckpt_every=0",
                                 "val.every=0"])
        trainer = Trainer(cfg)
        start = time.perf_counter()
        summary = trainer.fit()
        engine_wall = time.perf_counter() - start
        model = trainer.model
    # The bare loop: the same model class, head and batch on in-memory tensors (no data loading).
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x = torch.randn(batch, 3, 224, 224, device=args.device)
    y = torch.ones(batch, model.num_classes, device=args.device)

    def step() -> None:
        loss = F.multilabel_soft_margin_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # Timed from the first step on, like the engine's own images_per_s.
    synchronize(args.device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(args.device)
    bare = steps * batch / (time.perf_counter() - start)
    return {"batch": batch, "steps": steps, "engine_images_per_s": summary.get("images_per_s"),
            "engine_wall_images_per_s": steps * batch / engine_wall, "bare_images_per_s": bare,
            "engine_num_workers": cfg["data"]["num_workers"]}


def profile_config(model, spec: str, args, amp) -> dict[str, str]:
    """torch.profiler tables (top ops by self CPU time) of (c) and (d) for ``METHOD,SIZE,BATCH,K``."""
    from torch.profiler import ProfilerActivity, profile

    method, size, batch, k = spec.split(",")
    size, batch, k = int(size), int(batch), int(k)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(args.device)
    cls = torch.arange(k, device=args.device).repeat(batch, 1)
    tables = {}
    for name, fn in (("ours", lambda: localize(model, x, cls, method=method)),
                     ("loop", lambda: authors_maps(model, x, cls, method))):
        with amp():
            fn()  # warm-up
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=activities, profile_memory=True) as prof, amp():
            fn()
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    model.zero_grad(set_to_none=True)
    return tables


# ------------------------------------------------------------------------------------------------ report


def print_report(base: dict, maps: dict, eval_res, train_res, args) -> dict[str, Any]:
    """Print the tables and the target checks; return the checks."""
    rows = []
    for key, r in base.items():
        size, batch = key
        fwd, plain, fb = r["forward"], r["plain_sdpa"], r["forward_backward"]
        rows.append([size, batch, ms(fwd["best_s"]), ms(plain["best_s"]),
                     fmt_ratio(ratio(fwd["best_s"], plain["best_s"])), ms(fb["best_s"]), mib(fwd["peak_mib"]),
                     mib(fb["peak_mib"])])
    unit = f"{args.clock} ms per image, best of rounds; peak MiB per call"
    print(f"\n### (a) forward and (b) forward + backward ({unit})\n")
    print(markdown_table(["size", "batch", "(a) forward", "plain SDPA", "(a)/plain", "(b) fwd+bwd", "(a) peak",
                          "(b) peak"], rows))

    checks: dict[str, Any] = {"getam_k10_speedup": [], "getam_k1_speedup": []}
    for method in args.methods:
        rows = []
        for (m, size, batch, k), r in maps.items():
            if m != method:
                continue
            b_time = base[(size, batch)]["forward_backward"]["best_s"]
            c_time = r["ours"]["best_s"]
            loop = r["loop"]
            d_time = loop.get("best_s", loop.get("estimated_best_s"))
            est = "~" if "skipped" in loop else ""
            speedup = ratio(d_time, c_time)
            rows.append([size, batch, k, ms(c_time), mib(r["ours"]["peak_mib"]), est + ms(d_time),
                         mib(loop.get("peak_mib")), fmt_ratio(ratio(c_time, b_time)), fmt_ratio(speedup, est),
                         "—" if "max_abs_diff" not in r else f"{r['max_abs_diff']:.1e}"])
            if method == "getam" and k in (1, 10) and speedup is not None:
                checks[f"getam_k{k}_speedup"].append({"size": size, "batch": batch, "speedup": speedup,
                                                      "estimated": bool(est)})
            if size == 448 and k == 20 and batch == 1:
                checks[f"{method}_448_k20_peak_mib"] = r["ours"]["peak_mib"]
        print(f"\n### {method}: (c) ours vs (d) the authors' loop ({unit})\n")
        print(markdown_table(["size", "batch", "K", "(c) ours", "(c) peak", "(d) loop", "(d) peak", "(c)/(b)",
                              "(d)/(c)", "max |c-d|"], rows))
    print("\n~: (d) not run (over --loop-budget); its per-image time is the batch-1 figure of the same size and K.")

    overhead = [ratio(r["forward"]["best_s"], r["plain_sdpa"]["best_s"]) for r in base.values()]
    checks["forward_vs_plain_max"] = max(o for o in overhead if o is not None)
    print("\n### targets\n")
    lines = []
    for k, target in ((10, TARGETS["getam_k10"]), (1, TARGETS["getam_k1"])):
        vals = checks[f"getam_k{k}_speedup"]
        if vals:
            worst = min(v["speedup"] for v in vals)
            lines.append([f"GETAM (d)/(c) at K={k}", f">= {target:.0f}x", f"{worst:.2f}x (worst config)",
                          "met" if worst >= target else "MISSED"])
    lines.append(["forward / plain SDPA", f"<= {1 + TARGETS['forward_overhead']:.2f}",
                  f"{checks['forward_vs_plain_max']:.2f} (worst config)",
                  "met" if checks["forward_vs_plain_max"] <= 1 + TARGETS["forward_overhead"] else "MISSED"])
    for method in args.methods:
        peak = checks.get(f"{method}_448_k20_peak_mib")
        if peak is not None:
            lines.append([f"{method} maps 448x448, K=20, batch 1: peak", f"<= {TARGETS['memory_448_k20_mib']:.0f} MiB",
                          f"{peak:.0f} MiB", "met" if peak <= TARGETS["memory_448_k20_mib"] else "MISSED"])
    if isinstance(eval_res, dict):
        rate = max(v["masks_per_s"] for v in eval_res.values())
        cpu_rate = eval_res["workers_0"]["masks_per_cpu_s"]
        judged = cpu_rate if args.clock == "cpu" else rate
        checks["eval_masks_per_s"] = judged
        measured = ", ".join(f"{v['masks_per_s']:.0f} wall ({k.replace('_', ' ')})" for k, v in eval_res.items())
        lines.append(["wsss eval, 500x375 label PNGs", f">= {TARGETS['eval_masks_per_s']:.0f} masks/s",
                      f"{measured}; {cpu_rate:.0f} per CPU-second (workers 0)",
                      "met" if judged >= TARGETS["eval_masks_per_s"] else "MISSED"])
    else:
        lines.append(["wsss eval streaming", "", eval_res, ""])
    if isinstance(train_res, dict):
        lines.append(["wsss train vs bare loop (img/s)", "",
                      f"{train_res['engine_images_per_s']:.1f} (engine's own) / {train_res['bare_images_per_s']:.1f}",
                      ""])
    else:
        lines.append(["training throughput", "", train_res, ""])
    print(markdown_table(["target", "wanted", "measured", ""], lines))
    return checks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = set_threads(args.threads)
    device = torch.device(args.device)
    amp = (functools.partial(torch.autocast, device.type, dtype=torch.bfloat16) if args.bf16
           else contextlib.nullcontext)
    model = load_vit_tiny(device)
    plain = PlainViT({k: v.detach() for k, v in model.state_dict().items()}, model.num_heads, model.patch_size)
    print(f"ViT-Ti on {device} ({threads} thread(s), {args.clock} clock), sizes {args.sizes}, "
          f"batches {args.batches}, K {args.ks}, {args.repeat} timed round(s) after {args.warmup} warm-up call(s), "
          f"bf16 {args.bf16}, compile {args.compile}", flush=True)

    base: dict[tuple[int, int], dict] = {}
    maps: dict[tuple[str, int, int, int], dict] = {}
    plain_diff = {}
    skipped: list[str] = []
    gen = torch.Generator().manual_seed(0)
    for size in args.sizes:
        loop_b1: dict[tuple[str, int], tuple[float, float]] = {}
        for batch in sorted(args.batches):
            x = torch.randn(batch, 3, size, size, generator=gen).to(device)
            with torch.inference_mode():
                logits = model(x)
                plain_diff[f"{size}x{batch}"] = float((plain(x) - logits).abs().max())
            classes = logits.topk(max(args.ks), dim=1).indices  # the K most likely classes of each image
            base[(size, batch)] = bench_base(model, plain, x, classes, args, amp)
            print(f"[{size} b{batch}] forward {ms(base[(size, batch)]['forward']['best_s'])} ms/img", flush=True)
            for method in args.methods:
                for i, k in enumerate(sorted(args.ks)):
                    if batch * k * (size / 224) ** 2 > args.max_work:
                        skipped.append(f"{method} {size}x{size} batch {batch} K={k}")
                        continue
                    row = bench_maps(model, x, classes, method, k, loop_b1.get((method, k)), args, amp, i == 0)
                    maps[(method, size, batch, k)] = row
                    if batch == 1 and "best_s" in row["loop"]:
                        loop_b1[(method, k)] = (row["loop"]["best_s"], min(row["loop"]["wall_samples_s"]))
                    print(f"[{size} b{batch}] {method} K={k}: ours {ms(row['ours']['best_s'])} ms/img, loop "
                          f"{ms(row['loop'].get('best_s'))} ms/img", flush=True)

    eval_res = "skipped (--no-eval)" if args.no_eval else bench_eval(args.eval_images)
    train_res = "skipped (--no-train)" if args.no_train else bench_training(args)
    checks = print_report(base, maps, eval_res, train_res, args)
    if skipped:
        print(f"\nnot measured (over --max-work {args.max_work:g}): " + "; ".join(skipped))
    payload: dict[str, Any] = {
        "benchmark": "speed",
        "settings": {"model": VIT_TINY, "sizes": args.sizes, "batches": args.batches, "ks": args.ks,
                     "repeat": args.repeat, "forward_repeat": args.forward_repeat, "warmup": args.warmup,
                     "loop_budget_s": args.loop_budget, "max_work": args.max_work, "clock": args.clock,
                     "threads": threads, "bf16": args.bf16, "compile": args.compile, "input": "randn, seed 0",
                     "classes": "the K most likely classes of each image",
                     "timing": f"seconds per image by the {args.clock} clock; best_s = fastest round, "
                               "median_s = median round; both clocks' samples kept",
                     "peak_mib": "peak memory added by one call for the whole batch (see benchmarks/README.md)"},
        "environment": environment(device),
        "plain_vs_model_logits_max_abs_diff": plain_diff,
        "base": {f"{s}x{b}": r for (s, b), r in base.items()},
        "maps": {f"{m}/{s}x{b}/k{k}": r for (m, s, b, k), r in maps.items()},
        "eval": eval_res,
        "train": train_res,
        "checks": checks,
        "not_measured": skipped,
    }
    if args.profile:
        tables = profile_config(model, args.profile, args, amp)
        for name, table in tables.items():
            print(f"\n### profile of {name} ({args.profile})\n\n{table}")
        payload["profile"] = {"config": args.profile, **tables}
    print(f"\nwrote {write_json(args.out, payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
