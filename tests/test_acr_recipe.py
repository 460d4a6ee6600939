"""ACR's recipe as the authors ran it (methods.md §3): the classifier on block 11's class token before the final
LayerNorm (``head: token_prenorm``), maps on a square resize of each image (``square_sizes``), the VOC and COCO
presets on the R50+ViT hybrid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wsss.cli.main import main
from wsss.data.io import load_maps, read_image
from wsss.data.synth import make_synthetic
from wsss.data.transforms import eval_transforms
from wsss.data.voc import VOCDataset
from wsss.errors import ConfigError
from wsss.localize import localize
from wsss.localize.split import iter_split_maps
from wsss.models import HEADS, Capture, VisionTransformer, checkpoint, create_model
from wsss.models.checkpoint import describe, save
from wsss.train import load_config


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` with every parameter moved off its initialisation (a non-trivial final norm and head included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


# ------------------------------------------------------------------------------------------------ the classifier

@pytest.mark.parametrize("arch,size", [("vit_nano_patch16", 48), ("vit_base_r50_s16_384", 64)])
def test_token_prenorm_logits_are_a_linear_layer_on_the_last_blocks_raw_class_token(arch, size):
    torch.manual_seed(0)
    model = _perturbed(create_model(arch, num_classes=3, head="token_prenorm"), seed=1)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x, capture=Capture(hidden=True))
        plain = model(x)
    w, b = model.head.weight.double(), model.head.bias.double()
    raw = out.hidden[model.depth - 1][:, 0].double()  # block 11's output on the hybrid, before model.norm
    torch.testing.assert_close(out.logits.double(), raw @ w.T + b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, out.logits)

    # The same weights under `token` (same checkpoint keys, strict load) read the final-normed class token instead.
    assert {k for k in model.state_dict() if k.startswith("head")} == {"head.weight", "head.bias"}
    normed_model = create_model(arch, num_classes=3, head="token").eval()
    normed_model.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        normed = normed_model(x).double()
    ln = F.layer_norm(raw, raw.shape[-1:], model.norm.weight.double(), model.norm.bias.double(), eps=1e-6)
    torch.testing.assert_close(normed, ln @ w.T + b, atol=1e-5, rtol=1e-5)
    assert (normed - out.logits.double()).abs().max() > 0.1


def test_token_prenorm_is_a_registered_head_that_config_and_checkpoints_accept(tmp_path):
    assert "token_prenorm" in HEADS
    cfg = load_config(None, ["model.name=vit_nano_patch16", "model.head=token_prenorm"])
    assert cfg["model"]["head"] == "token_prenorm"
    torch.manual_seed(0)
    model = _perturbed(create_model("vit_nano_patch16", num_classes=2, head="token_prenorm"), seed=2)
    path = tmp_path / "model.safetensors"
    save(path, model, describe(model, "vit_nano_patch16", None, (0.5,) * 3, (0.5,) * 3, method="acr"))
    loaded, spec = checkpoint.load(path, "cpu")
    assert spec.head == "token_prenorm" and loaded.head_type == "token_prenorm"
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x))


# ------------------------------------------------------------------------------------------- the square views

def _small_model(head: str = "token_prenorm", seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=3, num_classes=4,
                              head_type=head)
    return _perturbed(model, seed + 10)


def _acr_grid_map(model: VisionTransformer, view: torch.Tensor, c: int) -> torch.Tensor:
    """ACR's raw map of one (1, 3, S, S) view for class c on its token grid, one class and one backward at a time:
    g = ReLU(class-token row of sum over the last 2 blocks of mean_h ReLU(dy_c / dA)), refined by the sum over every
    block of the head-mean patch-to-patch attention."""
    out = model(view, capture=Capture(attn=True))
    grads = torch.autograd.grad(out.logits[0, c], out.attn[-2:])
    g = sum(gr[0].clamp(min=0).mean(0) for gr in grads)[0, 1:].clamp(min=0)
    affinity = sum(a[0].detach().mean(0)[1:, 1:] for a in out.attn)
    return (affinity @ g).reshape(out.grid).detach()


def _manual_square_maps(model, images, classes, side, flip):
    """Resize each image to side x side by hand, make each view's map, upsample it to H x W (align_corners=True,
    as infer_cam.py), un-flip the mirrored view, sum, ReLU, min-max normalise (eps 1e-6)."""
    b, _, h, w = images.shape
    result = torch.zeros(b, len(classes[0]), h, w)
    for i in range(b):
        square = F.interpolate(images[i : i + 1], size=(side, side), mode="bilinear", align_corners=False)
        for k, c in enumerate(classes[i]):
            total = torch.zeros(h, w)
            for mirrored in ((False, True) if flip else (False,)):
                m = _acr_grid_map(model, square.flip(-1) if mirrored else square, c)
                m = F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=True)[0, 0]
                total += m.flip(-1) if mirrored else m
            total = total.clamp(min=0)
            result[i, k] = (total - total.min()) / (total.max() - total.min() + 1e-6)
    return result


@pytest.mark.parametrize("flip", [False, True])
def test_square_views_equal_a_manual_resize_map_resize_back(flip):
    model = _small_model()
    images = torch.randn(2, 3, 40, 72)  # non-square: a 5 x 9 grid at scale 1, a 6 x 6 grid on the 48 square
    classes = [[0, 3], [2, 1]]
    ours = localize(model, images, classes, method="acr", flip=flip, square_sizes=[48])
    assert ours.shape == (2, 2, 40, 72)
    ref = _manual_square_maps(model, images, classes, 48, flip)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    # The square geometry is not the aspect-keeping default, and not a no-op.
    default = localize(model, images, classes, method="acr", flip=flip)
    assert (default - ours).abs().max() > 0.05
    # A side that is not a multiple of the patch is rounded to the nearest one (50 -> 48).
    torch.testing.assert_close(localize(model, images, classes, method="acr", flip=flip, square_sizes=[50]), ours)


def test_two_square_sizes_sum_their_views():
    model = _small_model(seed=3)
    images = torch.randn(1, 3, 40, 56)
    raw = [localize(model, images, [[1]], method="acr", flip=True, square_sizes=[s], normalize=False)
           for s in (32, 48)]
    both = localize(model, images, [[1]], method="acr", flip=True, square_sizes=[32, 48], normalize=False)
    torch.testing.assert_close(both, raw[0] + raw[1])


def test_square_sizes_replace_the_scales():
    model = _small_model()
    images = torch.randn(1, 3, 32, 40)
    with pytest.raises(ConfigError, match="replace the scales"):
        localize(model, images, [[0]], method="acr", scales=[0.5, 1.0], square_sizes=[48])
    with pytest.raises(ConfigError, match="positive integers"):
        localize(model, images, [[0]], method="acr", square_sizes=[0])


def test_wsss_maps_with_square_sizes_equals_localize(tmp_path):
    torch.manual_seed(0)
    model = _perturbed(create_model("vit_nano_patch16", num_classes=4, head="token_prenorm"), seed=6)
    ckpt = tmp_path / "run" / "model.safetensors"
    ckpt.parent.mkdir()
    save(ckpt, model, describe(model, "vit_nano_patch16", None, (0.5,) * 3, (0.5,) * 3, method="acr"))
    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "out"
    argv = ["maps", str(photo), "--checkpoint", str(ckpt), "--method", "acr", "--classes", "2", "--square-sizes",
            "48", "--flip", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    maps, classes = load_maps(out / "photo.npz")
    tensor, _ = eval_transforms(None, (0.5,) * 3, (0.5,) * 3)(read_image(photo))
    expected = localize(model, tensor[None], [[2]], method="acr", flip=True, square_sizes=[48])[0].numpy()
    assert classes.tolist() == [2] and maps.shape == (1, 40, 64)
    assert np.abs(maps - expected).max() < 2e-3  # float16 storage
    # Square sizes with other scales is refused before any work.
    assert main(argv[:-4] + ["--scales", "2", "--out", str(tmp_path / "bad"), "--device", "cpu"]) == 2
    assert not (tmp_path / "bad").exists()


def _prenorm_run(tmp_path, split: str, data_seed: int, model_seed: int):
    """A 40-px synthetic dataset (2 images in ``split``) and a saved nano classifier with the prenorm head."""
    counts = {"num_train": 2, "num_val": 1} if split == "train" else {"num_train": 1, "num_val": 2}
    data = make_synthetic(tmp_path / "data", size=40, num_classes=2, seed=data_seed, **counts)
    dataset = VOCDataset(data, split)
    torch.manual_seed(0)
    model = _perturbed(create_model("vit_nano_patch16", num_classes=dataset.classes.num_fg, img_size=(32, 32),
                                    head="token_prenorm"), seed=model_seed)
    ckpt = tmp_path / "cls.safetensors"
    save(ckpt, model, describe(model, "vit_nano_patch16", classes=dataset.classes.names, method="acr"))
    return data, dataset, model, ckpt


def test_wsss_cam_with_square_sizes_writes_those_maps_and_records_them(tmp_path):
    data, dataset, model, ckpt = _prenorm_run(tmp_path, "val", data_seed=5, model_seed=4)
    out = tmp_path / "maps"
    assert main(["cam", "--checkpoint", str(ckpt), "--data", str(data), "--split", "val", "--method", "acr",
                 "--square-sizes", "64", "--flip", "--map-resolution", "full", "--out", str(out),
                 "--device", "cpu"]) == 0
    settings = json.loads((out / "wsss-manifest.json").read_text())["settings"]
    assert settings["square_sizes"] == [64] and settings["flip"] is True
    expected = {image_id: maps for image_id, maps, _ in
                iter_split_maps(model, dataset, "acr", flip=True, square_sizes=[64])}
    default = {image_id: maps for image_id, maps, _ in iter_split_maps(model, dataset, "acr", flip=True)}
    for image_id, maps in expected.items():
        stored, _ = load_maps(out / f"{image_id}.npz")
        assert stored.shape == maps.shape and np.abs(stored - maps).max() < 2e-3
        assert np.abs(default[image_id] - maps).max() > 0.05


# ----------------------------------------------------------------------------------------------------- presets

@pytest.mark.parametrize("preset", ["acr_voc", "acr_coco"])
def test_voc_and_coco_presets_run_the_hybrid_with_the_prenorm_head(preset):
    cfg = load_config(preset, ["data.root=/data"])
    assert cfg["model"]["name"] == "vit_base_r50_s16_384" and cfg["model"]["head"] == "token_prenorm"
    assert cfg["data"]["transforms"]["crop"] == 384 and cfg["model"]["weights"] is None
    assert cfg["val"]["square_sizes"] == [384] and cfg["val"]["flip"] is True


def test_val_square_sizes_reach_the_pipeline_views_and_exclude_scales():
    from wsss.pipeline import view_options

    cfg = load_config("acr_voc", ["data.root=/data"])

    class Run:  # the attributes view_options reads from a Trainer
        device, mean, std = torch.device("cpu"), (0.5,) * 3, (0.5,) * 3

    Run.cfg = cfg
    assert view_options(Run())["square_sizes"] == [384]
    with pytest.raises(ConfigError, match="square sizes replace the scales"):
        load_config("acr_voc", ["data.root=/data", "val.scales=[0.5,1.0]"])


def test_wsss_pseudo_from_a_checkpoint_uses_the_square_views(tmp_path):
    data, dataset, model, ckpt = _prenorm_run(tmp_path, "train", data_seed=7, model_seed=3)
    out = tmp_path / "labels"
    assert main(["pseudo", "--checkpoint", str(ckpt), "--data", str(data), "--split", "train", "--map-method", "acr",
                 "--threshold", "0.4", "--square-sizes", "64", "--flip", "--out", str(out), "--device", "cpu"]) == 0
    settings = json.loads((out / "wsss-manifest.json").read_text())["settings"]
    assert settings["maps_made_by"]["square_sizes"] == [64]
    from wsss.pseudo import maps_to_labels

    for image_id, maps, labels in iter_split_maps(model, dataset, "acr", flip=True, square_sizes=[64]):
        expected = maps_to_labels(torch.from_numpy(maps), labels, 0.4).numpy()
        assert (np.asarray(Image.open(out / f"{image_id}.png")) == expected).all()
    assert main(["pseudo", "--maps", str(out), "--data", str(data), "--split", "train", "--threshold", "0.4",
                 "--square-sizes", "64", "--out", str(tmp_path / "x")]) == 2


def test_acr_msrc_keeps_its_cpu_recipe():
    cfg = load_config("acr_msrc", ["data.root=/data"])
    assert (cfg["model"]["name"], cfg["model"]["head"]) == ("vit_tiny_patch16_224", "token")
    assert cfg["data"]["transforms"]["crop"] == 224 and cfg["train"]["steps"] == 160
    assert (cfg["method"]["alpha"], cfg["optim"]["lr"], cfg["val"]["scales"]) == (125.0, 1.0e-4, [1.0])
