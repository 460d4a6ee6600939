"""Localisation maps: batched gradient maps against a per-class loop, and zero-shot agreement on real horses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from reference_maps import reference_localize, reference_maps
from wsss.errors import ConfigError
from wsss.localize import localize
from wsss.methods import REGISTRY
from wsss.methods.getam import GETAM
from wsss.models import create_model, Capture
from wsss.models.vit import VisionTransformer

HORSE_CLASS = 339


def _small_model(head="token", num_classes=5, seed=0, img_size=32):
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=img_size, patch_size=8, embed_dim=24, depth=4, num_heads=3,
                              num_classes=num_classes, head_type=head).eval()
    # Larger-than-init weights so that attention is far from uniform and gradients are informative.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("method", ["getam", "acr", "rollout"])
def test_batched_maps_match_per_class_loop(method):
    model = _small_model(img_size=(32, 40))  # a non-square 4x5 grid
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 32, 40)
    classes = [[0, 3, 4], [2]]
    ours = localize(model, images, classes, method=method)
    for b, cls in enumerate(classes):
        ref = reference_maps(state, images[b : b + 1], cls, method, num_heads=3, patch=8)
        torch.testing.assert_close(ours[b, : len(cls)], ref, atol=2e-4, rtol=1e-3)
    assert torch.all(ours[1, 1:] == 0), "padded class slots must be empty maps"


@pytest.mark.parametrize("method", ["cam", "gradcam", "aream"])
def test_cam_gradcam_aream_values_against_the_functional_reference(method):
    """Every view of two scales (the second needs interpolated position embeddings) and their mirror images, on a
    non-square 4x6 grid, with an unused slot in the middle of a class list: the maps equal the view-by-view
    float64 reference of reference_maps.py."""
    model = _small_model(img_size=(32, 48))
    state = {k: v.detach().double() for k, v in model.state_dict().items()}
    images = torch.randn(2, 3, 32, 48)
    classes = torch.tensor([[0, -1, 4], [2, 1, -1]])
    ours = localize(model, images, classes, method=method, scales=(1.0, 1.5), flip=True)
    ref = reference_localize(state, images.double(), classes.tolist(), method, num_heads=3, patch=8,
                             scales=(1.0, 1.5), flip=True, base_grid=(4, 6)).float()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert ours[0, 1].abs().max() == 0 and ours[1, 2].abs().max() == 0
    # The maps are not trivially flat, and the classes and the views matter.
    assert all(float(ours[b, k].max()) > 0.99 for b, k in ((0, 0), (0, 2), (1, 0), (1, 1)))
    assert (ours[0, 0] - ours[0, 2]).abs().max() > 0.05
    single = localize(model, images, classes, method=method)
    assert (single - ours).abs().max() > 0.05


def test_start_layer_out_of_range_is_an_error():
    model = _small_model()
    for method in ("getam", "acr"):
        with pytest.raises(ValueError, match="start_layer"):
            localize(model, torch.randn(1, 3, 32, 32), [[0]], method=method, start_layer=4)
    # In range (negative counts from the end) it works and equals the non-negative index.
    image = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(localize(model, image, [[0]], method="getam", start_layer=-1),
                               localize(model, image, [[0]], method="getam", start_layer=3))


def test_getam_grad_power_one_differs_and_matches_reference():
    model = _small_model(seed=1)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    images = torch.randn(1, 3, 32, 32)
    ours1 = localize(model, images, [[1, 2]], method="getam", grad_power=1, start_layer=1)
    ours2 = localize(model, images, [[1, 2]], method="getam", grad_power=2, start_layer=1)
    ref1 = reference_maps(state, images, [1, 2], "getam", 3, start_layer=1, grad_power=1, patch=8)
    torch.testing.assert_close(ours1[0], ref1, atol=2e-4, rtol=1e-3)
    assert (ours1 - ours2).abs().max() > 1e-3


def test_all_methods_all_heads_run_and_flip_is_equivariant():
    for head in ("token", "gap", "conv", "mct", "getam"):
        model = _small_model(head=head)
        images = torch.randn(2, 3, 32, 32)
        for name, cls in REGISTRY.maps().items():
            if not cls.applies_to(model):  # the mctformer map on a head without per-class tokens
                assert head != "mct"
                with pytest.raises(ConfigError):
                    localize(model, images, [[1], [0]], method=name)
                continue
            maps = localize(model, images, torch.tensor([[1, 2], [0, 4]]), method=name)
            assert maps.shape == (2, 2, 32, 32)
            assert maps.min() >= 0 and maps.max() <= 1
            # A flipped input with flip aggregation gives the flipped maps of the original with flip aggregation.
            a = localize(model, images, [[1], [0]], method=name, flip=True)
            b = localize(model, images.flip(-1), [[1], [0]], method=name, flip=True)
            torch.testing.assert_close(a, b.flip(-1), atol=1e-4, rtol=1e-3)


def test_multiscale_raw_maps_are_sum_of_views():
    model = _small_model()
    images = torch.randn(1, 3, 32, 32)
    one = localize(model, images, [[1]], method="getam", normalize=False)
    half = localize(model, images, [[1]], method="getam", scales=(0.5,), normalize=False)
    both = localize(model, images, [[1]], method="getam", scales=(1.0, 0.5), normalize=False)
    torch.testing.assert_close(both, one + half)


def test_localizer_releases_model_and_rejects_use_after_release():
    model = _small_model()
    with GETAM(model) as loc:
        loc(torch.randn(1, 3, 32, 32), [[0]])
    assert loc.model is None
    with pytest.raises(RuntimeError):
        loc(torch.randn(1, 3, 32, 32), [[0]])
    assert model.training is False  # restored


def test_empty_label_sets_raise():
    with pytest.raises(ValueError, match="empty"):
        localize(_small_model(), torch.randn(2, 3, 32, 32), [[], []])


def _horses(shared_data, n):
    root = shared_data / "horses"
    ids = (root / "ImageSets/Segmentation/all.txt").read_text().split()[:n]
    images, masks = [], []
    for i in ids:
        im = Image.open(root / "JPEGImages" / f"{i}.jpg").convert("RGB").resize((224, 224), Image.BILINEAR)
        images.append((torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5)
        mk = Image.open(root / "SegmentationClass" / f"{i}.png").resize((224, 224), Image.NEAREST)
        masks.append(torch.from_numpy(np.array(mk)).long())
    return torch.stack(images), torch.stack(masks)


def _best_miou(maps, masks):
    best = 0.0
    for t in np.arange(0, 1, 0.01):
        pred = (maps > t).long()
        ious = []
        for c in (0, 1):
            inter = ((pred == c) & (masks == c)).sum().item()
            union = (((pred == c) | (masks == c)) & (masks != 255)).sum().item()
            ious.append(inter / max(union, 1))
        best = max(best, float(np.mean(ious)))
    return best


@pytest.mark.slow
@pytest.mark.parametrize("method", ["getam", "acr", "rollout"])
def test_zero_shot_horses_agree_with_independent_implementation(shared_data, vit_tiny_weights, method):
    images, masks = _horses(shared_data, 8)
    model = create_model("vit_tiny_patch16_224", weights=vit_tiny_weights).eval()
    state = {k: v.detach() for k, v in model.state_dict().items()}
    ours = localize(model, images, [[HORSE_CLASS]] * len(images), method=method)[:, 0]
    ref = torch.stack([reference_maps(state, images[i : i + 1], [HORSE_CLASS], method, num_heads=3)[0]
                       for i in range(len(images))])
    for a, b in zip(ours, ref):
        corr = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert corr >= 0.99
    assert abs(_best_miou(ours, masks) - _best_miou(ref, masks)) <= 0.01
    assert _best_miou(ours, masks) > 0.45  # the maps localise horses, not noise


def test_prefix_only_last_block_and_partial_capture_keep_logits():
    model = _small_model()
    x = torch.randn(2, 3, 32, 32)
    full = model(x, capture=Capture(attn=True))
    fast = model(x, capture=Capture(attn=True, prefix_only_last=True, capture_from_block=2))
    torch.testing.assert_close(fast.logits, full.logits, atol=1e-5, rtol=1e-5)
    assert fast.attn[0] is None and fast.attn[1] is None
    torch.testing.assert_close(fast.attn[2], full.attn[2])
    torch.testing.assert_close(fast.attn[-1], full.attn[-1][:, :, :1])  # only the class-token query row
    with pytest.raises(ValueError, match="class token"):
        _small_model(head="gap")(x, capture=Capture(prefix_only_last=True))
