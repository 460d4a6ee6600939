"""Split inference at scale: batches by size, loader workers, compact maps, and sharding over torchrun ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from random_classifier import save_random_classifier
from wsss.cli.main import main
from wsss.data.io import load_maps, save_maps
from wsss.data.manifest import (OutputManifest, consolidate_parts, manifest_path, part_path, part_paths,
                                read_manifest)
from wsss.data.voc import VOCDataset
from wsss.errors import DataError
from wsss.data.batches import size_batches
from wsss.localize.split import iter_split_maps
from wsss.models import create_model

REPO = Path(__file__).resolve().parents[1]
# Three sizes among them (320x213, 320x240 and 240x320), so batches group by size.
IDS = ["10_10_s", "12_34_s", "10_18_s", "16_26_s", "13_26_s", "10_26_s", "10_2_s"]
MEAN = STD = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def msrc_subset(shared_data, tmp_path_factory) -> Path:
    """A VOC-layout root over seven MSRC val images (linked, not copied)."""
    src = shared_data / "msrc"
    root = tmp_path_factory.mktemp("msrc_subset")
    for name in ("JPEGImages", "SegmentationClass", "classes.txt"):
        (root / name).symlink_to(src / name)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(IDS) + "\n")
    return root


@pytest.fixture(scope="module")
def classifier(msrc_subset, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    return path, save_random_classifier(path, VOCDataset(msrc_subset, "val"), 5, MEAN, STD)


def test_size_batches_group_by_size_and_keep_order():
    sizes = [(2, 3), (4, 5), (2, 3), (2, 3), (4, 5), (1, 1)]
    assert size_batches(sizes, 2) == [[0, 2], [3], [1, 4], [5]]
    assert size_batches(sizes, 1) == [[i] for i in range(6)]
    with pytest.raises(ValueError):
        size_batches(sizes, 0)


@pytest.mark.parametrize("method", ["getam", "cam"])
def test_batched_maps_equal_the_one_image_path(msrc_subset, classifier, method):
    _, model = classifier
    dataset = VOCDataset(msrc_subset, "val")
    one = {i: (m, l) for i, m, l in iter_split_maps(model, dataset, method, mean=MEAN, std=STD, batch_size=1)}
    batched = list(iter_split_maps(model, dataset, method, mean=MEAN, std=STD, batch_size=3,
                                   num_workers=2 if method == "getam" else 0))
    assert sorted(i for i, _, _ in batched) == sorted(IDS)
    # Grouped by size (the four 320x213 images, then the two 320x240, then the 240x320), split order within.
    assert [i for i, _, _ in batched] == ["10_10_s", "10_18_s", "10_26_s", "10_2_s", "12_34_s", "13_26_s", "16_26_s"]
    worst = 0.0
    for image_id, maps, labels in batched:
        ref_maps, ref_labels = one[image_id]
        assert labels.tolist() == ref_labels.tolist() and maps.shape == ref_maps.shape
        worst = max(worst, float(np.abs(maps - ref_maps).max()))
    assert worst <= 1e-5
    # The maps are not trivially equal: they differ between images and classes.
    assert np.abs(one["10_10_s"][0][0] - one["10_18_s"][0][0]).max() > 0.1


def test_a_corrupt_image_in_a_loader_worker_is_named(msrc_subset, classifier, tmp_path):
    _, model = classifier
    root = tmp_path / "broken"
    (root / "JPEGImages").mkdir(parents=True)
    for name in ("SegmentationClass", "classes.txt"):
        (root / name).symlink_to(msrc_subset / name)
    for image_id in IDS[:3]:
        (root / "JPEGImages" / f"{image_id}.jpg").symlink_to((msrc_subset / "JPEGImages" / f"{image_id}.jpg").resolve())
    bad = root / "JPEGImages" / "10_26_s.jpg"
    bad.write_bytes(b"not a jpeg")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(IDS[:3] + ["10_26_s"]) + "\n")
    dataset = VOCDataset(root, "val")
    with pytest.raises(DataError, match="10_26_s.jpg"):
        list(iter_split_maps(model, dataset, "cam", mean=MEAN, std=STD, batch_size=1, num_workers=1))


def test_compact_maps_are_small_and_read_back_at_full_size(tmp_path):
    # Maps as a localiser makes them: smooth on the 16-pixel token grid, bilinearly upsampled to the image.
    torch.manual_seed(0)
    grid = torch.rand(2, 1, 15, 20)
    maps = torch.nn.functional.interpolate(grid, size=(240, 320), mode="bilinear", align_corners=True)[:, 0].numpy()
    save_maps(tmp_path / "full.npz", maps, [3, 7])
    save_maps(tmp_path / "compact.npz", maps, [3, 7], stride=4)
    full, classes = load_maps(tmp_path / "full.npz")
    compact, compact_classes = load_maps(tmp_path / "compact.npz")
    assert compact.shape == full.shape == (2, 240, 320) and compact_classes.tolist() == classes.tolist() == [3, 7]
    error = np.abs(compact - maps)
    assert error.mean() < 0.01 and np.percentile(error, 99) < 0.06  # uniform noise on the grid: the worst case
    assert ((compact > 0.5) == (maps > 0.5)).mean() > 0.98
    assert (tmp_path / "compact.npz").stat().st_size * 10 <= (tmp_path / "full.npz").stat().st_size
    # A size that the stored maps do not fit is a named error, not a silent resize.
    with np.load(tmp_path / "compact.npz") as z:
        np.savez(tmp_path / "bad.npz", maps=z["maps"], classes=z["classes"], size=np.array([30, 40]))
    with pytest.raises(DataError, match="bad.npz"):
        load_maps(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="stride"):
        save_maps(tmp_path / "x.npz", maps, [3, 7], stride=0)


def _cam(path: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["cam", "--checkpoint", str(path), "--data", str(data), "--split", "val", "--method", "getam",
            "--out", str(out), "--device", "cpu", "--threshold", "0.3", *extra]


def test_compact_cam_scores_like_full_maps(msrc_subset, classifier, tmp_path):
    path, _ = classifier
    from wsss.evaluate.split import evaluate_split

    assert main(_cam(path, msrc_subset, tmp_path / "full", "--map-resolution", "full")) == 0
    assert main(_cam(path, msrc_subset, tmp_path / "compact")) == 0
    full = evaluate_split(msrc_subset, "val", tmp_path / "full", threshold=0.3, progress=False)
    compact = evaluate_split(msrc_subset, "val", tmp_path / "compact", threshold=0.3, progress=False)
    assert abs(full["miou"] - compact["miou"]) < 0.001, (full["miou"], compact["miou"])  # the issue: 0.1 mIoU
    size = {k: sum(p.stat().st_size for p in (tmp_path / k).glob("*.npz")) for k in ("full", "compact")}
    assert size["compact"] * 10 <= size["full"]
    assert read_manifest(tmp_path / "compact")["settings"]["map_stride"] == 4


def _settings(**extra):
    return {"method": "getam", **extra}


def test_part_manifests_read_as_one_and_consolidate(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    parts = [OutputManifest.open(out, "cam", _settings(), tmp_path, "val", part=r) for r in (0, 1)]
    for rank, name in ((0, "a.npz"), (1, "b.npz"), (0, "c.npz")):
        (out / name).write_bytes(name.encode())
        parts[rank].record(name)
    for part in parts:
        part.flush()
    assert not manifest_path(out).exists() and len(part_paths(out)) == 2
    assert sorted(json.loads(part_path(out, 1).read_text())["files"]) == ["b.npz"]  # one writer per file
    assert sorted(read_manifest(out)["files"]) == ["a.npz", "b.npz", "c.npz"]
    # A single process resumes over the parts and absorbs them on its first write.
    single = OutputManifest.open(out, "cam", _settings(), tmp_path, "val")
    assert all(single.trusted(n) for n in ("a.npz", "b.npz", "c.npz"))
    single.flush()
    assert part_paths(out) == [] and sorted(read_manifest(out)["files"]) == ["a.npz", "b.npz", "c.npz"]
    # A part made with other settings is refused by name.
    other = OutputManifest.open(tmp_path / "o2", "cam", _settings(method="cam"), tmp_path, "val", part=3)
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "d.npz").write_bytes(b"d")
    other.record("d.npz")
    other.flush()
    (out / "wsss-manifest.part-3.json").write_bytes(part_path(tmp_path / "o2", 3).read_bytes())
    with pytest.raises(DataError, match="part-3"):
        read_manifest(out)
    # --overwrite deletes the listed files of the manifest and of every part.
    OutputManifest.open(out, "cam", _settings(method="cam"), tmp_path, "val", overwrite=True)
    assert not any(out.iterdir())
    consolidate_parts(out)  # nothing to merge: a no-op


@pytest.mark.slow
def test_torchrun_two_ranks_write_the_files_of_one_process(msrc_subset, classifier, tmp_path):
    from test_distributed import free_port

    path, _ = classifier
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "wsss.cli.main",
           *_cam(path, msrc_subset, tmp_path / "ranks")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote 7 map files") == 1  # one merged summary, from rank 0
    assert main(_cam(path, msrc_subset, tmp_path / "one")) == 0
    names = sorted(str(p.relative_to(tmp_path / "one")) for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(tmp_path / "ranks")) for p in (tmp_path / "ranks").rglob("*")
                           if p.is_file())
    assert part_paths(tmp_path / "ranks") == []
    for image_id in IDS:
        a, _ = load_maps(tmp_path / "one" / f"{image_id}.npz")
        b, _ = load_maps(tmp_path / "ranks" / f"{image_id}.npz")
        assert np.abs(a - b).max() <= 1e-3  # float16 storage of maps equal to 1e-5
        assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / "labels" / f"{image_id}.png")),
                              np.asarray(Image.open(tmp_path / "ranks" / "labels" / f"{image_id}.png")))
    one, ranks = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "ranks")
    assert sorted(one["files"]) == sorted(ranks["files"]) and one["settings"] == ranks["settings"]
    # A rerun on two ranks resumes: nothing left to do.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 0 map files" in proc.stdout and "7 of 7 images already done" in proc.stdout


def test_pseudo_straight_from_a_checkpoint_equals_pseudo_from_map_files(msrc_subset, classifier, tmp_path):
    path, _ = classifier
    assert main(_cam(path, msrc_subset, tmp_path / "maps", "--map-resolution", "full")) == 0
    common = ["pseudo", "--data", str(msrc_subset), "--split", "val", "--threshold", "0.3", "--refine", "pamr"]
    assert main([*common, "--maps", str(tmp_path / "maps"), "--out", str(tmp_path / "from_files")]) == 0
    assert main([*common, "--checkpoint", str(path), "--map-method", "getam", "--out", str(tmp_path / "direct"),
                 "--device", "cpu"]) == 0
    assert not list((tmp_path / "direct").glob("*.npz"))
    agree, labelled = 0, 0
    for image_id in IDS:
        a = np.asarray(Image.open(tmp_path / "from_files" / f"{image_id}.png"))
        b = np.asarray(Image.open(tmp_path / "direct" / f"{image_id}.png"))
        agree, labelled = agree + int((a == b).sum()), labelled + a.size
        assert len(np.unique(b)) >= 2  # the labels are not one flat class
    assert agree / labelled > 0.999  # the files hold float16 maps: only pixels at the threshold may differ
    made_by = read_manifest(tmp_path / "direct")["settings"]["maps_made_by"]
    assert made_by["method"] == "getam" and made_by["checkpoint_sha256"].startswith("sha256:")
    with pytest.raises(SystemExit):  # one source of maps
        main([*common, "--maps", str(tmp_path / "maps"), "--checkpoint", str(path), "--out", str(tmp_path / "x")])


def test_batched_predict_writes_the_labels_of_one_image_at_a_time(msrc_subset, tmp_path):
    from wsss.models.segmenter import SegmentationModel
    from wsss.segment.predict import predict_split

    dataset = VOCDataset(msrc_subset, "val", require_labels=False)
    torch.manual_seed(2)
    model = SegmentationModel(create_model("vit_nano_patch16", num_classes=15), dataset.classes.num_classes, dim=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    assert predict_split(model, dataset, tmp_path / "one", scales=(1.0, 0.75), flip=True, progress=False) == (7, 0)
    assert predict_split(model, dataset, tmp_path / "batched", scales=(1.0, 0.75), flip=True, batch_size=4,
                         num_workers=1, indices=range(1, 7), progress=False) == (6, 0)
    assert not (tmp_path / "batched" / f"{IDS[0]}.png").exists()  # only the indices asked for
    classes = set()
    for image_id in IDS[1:]:
        a = np.asarray(Image.open(tmp_path / "one" / f"{image_id}.png"))
        b = np.asarray(Image.open(tmp_path / "batched" / f"{image_id}.png"))
        assert np.array_equal(a, b), image_id
        classes |= set(np.unique(a).tolist())
    assert len(classes) > 2


def test_getam_square_test_geometry(msrc_subset):
    from wsss.models.segmenter import SegmentationModel
    from wsss.segment.predict import predict_probs

    torch.manual_seed(4)
    model = SegmentationModel(create_model("vit_nano_patch16", num_classes=15), 16, dim=16).eval()
    images = torch.randn(2, 3, 40, 56)
    probs = predict_probs(model, images, square_sizes=(32, 48))
    views = []
    for size in (32, 48):
        logits = model(torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                       align_corners=False))
        views.append(torch.nn.functional.interpolate(logits, size=(40, 56), mode="bilinear", align_corners=False))
    torch.testing.assert_close(probs, ((views[0] + views[1]) / 2).softmax(dim=1))
    assert not torch.allclose(probs, predict_probs(model, images))  # not the aspect-keeping views
    with pytest.raises(SystemExit):
        main(["predict", "--checkpoint", "x", "--data", str(msrc_subset), "--out", "o", "--square-sizes", "0"])
