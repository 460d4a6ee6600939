"""PSA's mask step: pair geometry, pair labels and loss, AffinityNet, the confident labels and the random walk.

Each batched function is checked against a slow reference written differently: loops over pixel pairs, an
explicit transition matrix, per-pixel CRF-free label rules.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.data.classes import ClassSet
from wsss.data.io import IGNORE_INDEX
from wsss.errors import ConfigError
from wsss.methods.affinity.objective import AffinityObjective, AffinityOptions
from wsss.methods.affinity.pairs import PairLabels, affinity_loss, pair_labels
from wsss.models import Capture, create_model
from wsss.models.affinitynet import (ResNet38AffinityNet, ViTAffinityNet, build_affinity_net, dense_affinity,
                                     pair_affinity,
                                     pair_indices, pair_offsets)
from wsss.models.resnet38 import ResNet38
from wsss.pseudo.labels import psa_confident_labels
from wsss.refine.affinity import psa_random_walk


def reference_offsets(radius: int) -> set[tuple[int, int]]:
    """Every offset to a partner 'ahead' of a pixel in raster order, strictly closer than the radius."""
    return {(dy, dx) for dy in range(0, radius) for dx in range(-radius, radius + 1)
            if (dy > 0 or dx > 0) and dy * dy + dx * dx < radius * radius}


def test_pair_offsets_are_the_forward_half_disc():
    assert len(pair_offsets(5)) == 34  # PSA's radius-5 neighbourhood
    for radius in (2, 3, 5, 7):
        offsets = pair_offsets(radius)
        assert len(set(offsets)) == len(offsets)
        assert set(offsets) == reference_offsets(radius)
    with pytest.raises(ValueError):
        pair_offsets(1)


def test_pair_indices_cover_every_interior_pixel_and_its_partners():
    h, w, r = 9, 12, 4
    source, targets = pair_indices(r, (h, w))
    offsets = pair_offsets(r)
    expected_sources = [y * w + x for y in range(h) for x in range(w)
                        if all(0 <= y + dy < h and 0 <= x + dx < w for dy, dx in reference_offsets(r))]
    assert source.tolist() == expected_sources
    for p, (dy, dx) in enumerate(offsets):
        assert targets[p].tolist() == [s + dy * w + dx for s in expected_sources]
    with pytest.raises(ValueError, match="too small"):
        pair_indices(5, (4, 20))


def slow_pair_labels(label: np.ndarray, radius: int, background: int = 0):
    """Loop over each interior pixel and each partner; returns {(from, to): kind}."""
    h, w = label.shape
    kinds = {}
    for y in range(h):
        for x in range(w):
            partners = [(y + dy, x + dx) for dy, dx in reference_offsets(radius)]
            if not all(0 <= a < h and 0 <= b < w for a, b in partners):
                continue
            for a, b in partners:
                u, v = int(label[y, x]), int(label[a, b])
                if u == IGNORE_INDEX or v == IGNORE_INDEX:
                    kind = None
                elif u != v:
                    kind = "neg"
                else:
                    kind = "bg" if u == background else "fg"
                kinds[(y * w + x, a * w + b)] = kind
    return kinds


def test_pair_labels_equal_a_loop_over_pixel_pairs():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (2, 10, 13), generator=g)
    labels[labels == 3] = IGNORE_INDEX
    labels[0, :4, :5] = 2  # a same-class block, so every kind occurs
    r = 5
    got = pair_labels(labels, r)
    source, targets = pair_indices(r, (10, 13))
    for b in range(2):
        slow = slow_pair_labels(labels[b].numpy(), r)
        assert len(slow) == targets.numel()
        for p in range(targets.shape[0]):
            for m in range(targets.shape[1]):
                kind = slow[(int(source[m]), int(targets[p, m]))]
                flags = (bool(got.background[b, p, m]), bool(got.foreground[b, p, m]), bool(got.negative[b, p, m]))
                assert flags == (kind == "bg", kind == "fg", kind == "neg")
    assert all(int(t.sum()) > 0 for t in got)


def test_pair_labels_without_background_class():
    labels = torch.zeros(1, 6, 9, dtype=torch.long)
    got = pair_labels(labels, 3, background_label=-1)
    assert not got.background.any() and got.foreground.all() and not got.negative.any()


def test_pair_affinity_and_dense_matrix_by_hand():
    g = torch.Generator().manual_seed(1)
    features = torch.rand(2, 5, 7, 10, generator=g)
    r = 4
    aff = pair_affinity(features, r)
    dense = dense_affinity(aff, (7, 10), r)
    flat = features.flatten(2)
    n = 70
    offsets = reference_offsets(r)
    for b in range(2):
        expected = torch.zeros(n, n)
        for i in range(n):
            yi, xi = divmod(i, 10)
            for j in range(n):
                yj, xj = divmod(j, 10)
                if i == j:
                    expected[i, j] = 1.0
                    continue
                fwd = (yj - yi, xj - xi) if (yj, xj) > (yi, xi) else (yi - yj, xi - xj)
                lo, hi = (i, j) if (yj, xj) > (yi, xi) else (j, i)
                ylo, xlo = divmod(lo, 10)
                interior = all(0 <= ylo + dy < 7 and 0 <= xlo + dx < 10 for dy, dx in offsets)
                if fwd in offsets and interior:
                    expected[i, j] = math.exp(-float((flat[b, :, i] - flat[b, :, j]).abs().mean()))
        torch.testing.assert_close(dense[b], expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        dense_affinity(aff, (8, 10), r)


def reference_walk(maps: np.ndarray, affinity: np.ndarray, stride: int, background: float, beta: float,
                   logt: int) -> np.ndarray:
    """One image, float64: the padded stack, per-cell means, an explicit T = W / colsum raised to 2^logt."""
    k, h, w = maps.shape
    gh, gw = -(-h // stride), -(-w // stride)
    stack = np.zeros((k + 1, gh * stride, gw * stride))
    stack[0, :h, :w] = background
    stack[1:, :h, :w] = maps
    cells = stack.reshape(k + 1, gh, stride, gw, stride).mean(axis=(2, 4)).reshape(k + 1, -1)
    weights = affinity.astype(np.float64) ** beta
    n = weights.shape[0]
    trans = np.empty((n, n))
    for j in range(n):
        column = sum(weights[i, j] for i in range(n))
        for i in range(n):
            trans[i, j] = weights[i, j] / column
    walked = cells @ np.linalg.matrix_power(trans, 2 ** logt)
    up = torch.nn.functional.interpolate(torch.from_numpy(walked.reshape(1, k + 1, gh, gw)),
                                         size=(gh * stride, gw * stride), mode="bilinear", align_corners=False)
    return up[0, :, :h, :w].numpy()


@pytest.mark.parametrize("size", [(24, 32), (21, 30)])  # divisible by the stride, and padded
def test_random_walk_equals_a_dense_per_image_reference(size):
    g = torch.Generator().manual_seed(2)
    h, w = size
    stride = 4
    maps = torch.rand(2, 3, h, w, generator=g)
    features = torch.rand(2, 6, -(-h // stride), -(-w // stride), generator=g)
    affinity = dense_affinity(pair_affinity(features, 3), features.shape[-2:], 3)
    got = psa_random_walk(maps, affinity, stride, background=0.39, beta=8, log_steps=6)
    assert got.shape == (2, 4, h, w)
    for b in range(2):
        expected = reference_walk(maps[b].double().numpy(), affinity[b].double().numpy(), stride, 0.39, 8, 6)
        np.testing.assert_allclose(got[b].numpy(), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        psa_random_walk(maps, affinity, stride=2)


def test_random_walk_fills_a_hole_inside_its_affinity_region():
    """Two regions with affinity 1 inside and ~0 across: a class covering region A but for a hole fills the hole,
    and nothing leaks into region B."""
    h, w = 8, 16
    features = torch.zeros(1, 1, h, w)
    features[..., 8:] = 50.0  # exp(-50)^8: no affinity across the border
    affinity = dense_affinity(pair_affinity(features, 3), (h, w), 3)
    maps = torch.zeros(1, 1, h, w)
    maps[0, 0, :, :8] = 0.9
    maps[0, 0, 3:5, 2:4] = 0.0
    labels = psa_random_walk(maps, affinity, 1, background=0.39, beta=8, log_steps=6).argmax(dim=1)[0]
    assert (labels[:, :8] == 1).all()
    assert (labels[:, 8:] == 0).all()


def test_random_walk_labels_favour_the_seed_class_in_its_region():
    h, w = 8, 16
    features = torch.zeros(1, 1, h, w)
    features[..., 8:] = 50.0
    affinity = dense_affinity(pair_affinity(features, 3), (h, w), 3)
    maps = torch.zeros(1, 2, h, w)
    maps[0, 0, :, :8] = 0.9
    maps[0, 1, 2:4, 10:12] = 1.0
    labels = psa_random_walk(maps, affinity, 1, background=0.39).argmax(dim=1)[0]
    assert (labels[:, :8] == 1).all() and (labels[:, 8:] == 0).all()  # 4/64 of a seed stays below 0.39


def test_confident_labels_by_hand():
    maps = torch.tensor([[[0.95, 0.6, 0.05, 0.3]], [[0.0, 0.0, 0.0, 0.5]]])  # (K=2, 1, 4)
    labels = psa_confident_labels(maps, [3, 7], low_alpha=1, high_alpha=12)
    # pixel 0: low run bg = 0.05 < 0.95 -> class 3. pixel 1: low bg 0.4 < 0.6 -> 3. pixel 2: high bg 0.95^12 = 0.54
    # > 0.05 -> background. pixel 3: low bg 0.5 ties with 0.5 -> background in the low run; high bg 0.5^12 < 0.5 ->
    # class 7 in the high run: unsure, 255.
    assert labels.tolist() == [[3, 3, 0, IGNORE_INDEX]]
    assert psa_confident_labels(maps, [3, 7], 1, 12, background_label=IGNORE_INDEX)[0, 2] == IGNORE_INDEX
    with pytest.raises(ValueError):
        psa_confident_labels(maps, [3, 7], low_alpha=12, high_alpha=1)


def test_confident_labels_match_per_pixel_rule():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 9, 11, generator=g) ** 2
    classes = [5, 2, 9]
    got = psa_confident_labels(maps, classes, 1.0, 12.0)
    for y in range(9):
        for x in range(11):
            v = maps[:, y, x]
            order = np.argsort(classes)
            values = v[order]
            labels_sorted = sorted(classes)

            def run(alpha: float) -> int:
                scores = [float((1 - values.max()) ** alpha)] + values.tolist()
                best = int(np.argmax(scores))  # first maximum: background wins ties
                return 0 if best == 0 else labels_sorted[best - 1]

            low, high = run(1.0), run(12.0)
            expected = 0 if high == 0 else (low if low != 0 else IGNORE_INDEX)
            assert int(got[y, x]) == expected


def test_affinity_loss_by_hand():
    aff = torch.tensor([[[0.9, 0.2], [0.5, 0.99]]])
    targets = PairLabels(background=torch.tensor([[[True, False], [False, False]]]),
                            foreground=torch.tensor([[[False, False], [False, True]]]),
                            negative=torch.tensor([[[False, True], [True, False]]]))
    loss, logs = affinity_loss(aff, targets)
    bg = -math.log(0.9 + 1e-5) / (1 + 1e-5)
    fg = -math.log(0.99 + 1e-5) / (1 + 1e-5)
    neg = -(math.log(1 + 1e-5 - 0.2) + math.log(1 + 1e-5 - 0.5)) / (2 + 1e-5)
    assert float(loss) == pytest.approx(bg / 4 + fg / 4 + neg / 2, rel=1e-6)
    assert logs["aff_neg"] == pytest.approx(neg, rel=1e-6)


def test_resnet38_affinitynet_has_psas_names_and_freezing():
    torch.manual_seed(0)
    net = ResNet38AffinityNet()
    backbone_keys = list(ResNet38().state_dict())
    own = net.state_dict()
    assert list(own)[:len(backbone_keys)] == backbone_keys
    extra = {k: tuple(v.shape) for k, v in own.items() if k not in backbone_keys}
    assert extra == {"f8_3.weight": (64, 512, 1, 1), "f8_4.weight": (128, 1024, 1, 1),
                     "f8_5.weight": (256, 4096, 1, 1), "f9.weight": (448, 448, 1, 1)}
    frozen = {name.split(".")[0] for name, p in net.named_parameters() if not p.requires_grad and "bn" not in name}
    assert frozen == {"conv1a", "b2", "b2_1", "b2_2"}
    net.train()
    assert all(not m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    net.load_state_dict({k: v.clone() for k, v in own.items()}, strict=True)
    net.eval()
    with torch.no_grad():
        features = net(torch.rand(1, 3, 72, 80))
        assert features.shape == (1, 448, 9, 10)
        assert bool((features > -1).all())  # ELU output
        assert net.affinity(torch.rand(1, 3, 72, 80)).shape == (1, 34, 5 * 2)


def test_build_affinity_net_copies_the_resnet38_backbone():
    torch.manual_seed(0)
    backbone = ResNet38()
    net = build_affinity_net(backbone, radius=5)
    for key, value in backbone.state_dict().items():
        assert torch.equal(net.state_dict()[key], value)
    with pytest.raises(ValueError, match="ViT blocks"):
        build_affinity_net(backbone, levels=[1, 2, 3])
    with pytest.raises(ConfigError, match="needs a ViT"):
        AffinityObjective(AffinityOptions(), ClassSet(("background", "a"))).build_model(torch.nn.Linear(2, 2))


def test_vit_affinitynet_reads_three_blocks():
    torch.manual_seed(0)
    vit = create_model("vit_nano_patch16", num_classes=4)
    net = ViTAffinityNet(vit, radius=3)
    assert net.levels == (1, 2, 3) and vit.num_classes == 0
    x = torch.rand(2, 3, 96, 128)
    features = net(x)
    assert features.shape == (2, 448, 6, 8)
    # By hand: blocks 1 and 2 through their own LayerNorm, block 3 (the last) through the backbone's final norm.
    out = vit(x, capture=Capture(hidden=True))
    grids = [norm(out.hidden[level])[:, 1:].permute(0, 2, 1).reshape(2, -1, 6, 8)
             for level, norm in zip((1, 2), net.norms)]
    grids.append(vit.norm(out.hidden[3])[:, 1:].permute(0, 2, 1).reshape(2, -1, 6, 8))
    head = net.affinity_head
    expected = F.elu(head.f9(torch.cat([F.elu(conv(g)) for conv, g in zip((head.f8_3, head.f8_4, head.f8_5), grids)],
                                       dim=1)))
    torch.testing.assert_close(features, expected)
    dense = net.dense_affinity(x)
    assert dense.shape == (2, 48, 48)
    torch.testing.assert_close(dense, dense.transpose(1, 2))
    assert torch.all(torch.diagonal(dense, dim1=1, dim2=2) == 1)


def test_affinity_objective_trains_a_vit_affinitynet():
    """Pair labels of a two-region mask: a few SGD steps lower the loss and separate the regions' features."""
    torch.manual_seed(0)
    classes = ClassSet(("background", "thing"))
    objective = AffinityObjective(AffinityOptions(radius=3), classes)
    model = objective.build_model(create_model("vit_nano_patch16", num_classes=1))
    images = torch.rand(2, 3, 96, 96)
    images[:, :, :, 48:] += 1.0  # the object half is brighter
    mask = torch.zeros(2, 96, 96, dtype=torch.long)
    mask[:, :, 48:] = 1
    mask[:, :, 40:56] = IGNORE_INDEX
    batch = {"image": images, "mask": mask}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(25):
        loss, logs = objective(model, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert set(logs) == {"aff_bg", "aff_fg", "aff_neg", "pairs_labelled"}
    assert losses[-1] < 0.6 * losses[0]
