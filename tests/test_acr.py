"""ACR's objective: flip alignment on non-square grids, the loss value against a slow reference, equivariance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsss.data.transforms import build_transforms
from wsss.errors import ConfigError
from wsss.models import create_model, Capture
from wsss.methods import get_method
from wsss.methods.acr.objective import ACRObjective, consistency_terms, unflip_attention, unflip_index
from wsss.train import load_config
from wsss.train.objectives import build_objective


def flip_matrix(h: int, w: int) -> torch.Tensor:
    """The N x N permutation matrix with (P v)[r, q] = v[r, w - 1 - q], built entry by entry."""
    n = h * w
    P = torch.zeros(n, n, dtype=torch.float64)
    for r in range(h):
        for q in range(w):
            P[r * w + q, r * w + (w - 1 - q)] = 1.0
    return P


def reference_terms(a1: torch.Tensor, a2: torch.Tensor, h: int, w: int, prefix: int) -> tuple[float, float]:
    """ACR's two terms with the flip as P A P^T on the patch block and v P^T on the class rows."""
    P = flip_matrix(h, w)
    a1, a2 = a1.double(), a2.double()
    cls2 = a2[..., :prefix, prefix:] @ P.T
    pairs2 = P @ a2[..., prefix:, prefix:] @ P.T
    cls_term = (a1[..., :prefix, prefix:] - cls2).abs().mean()
    pair_term = (a1[..., prefix:, prefix:] - pairs2).abs().mean()
    return float(cls_term), float(pair_term)


def test_unflip_index_on_a_3x5_grid():
    # Row-major 3 x 5 grid: the flipped view's token (r, q) sits at (r, 4 - q).
    assert unflip_index((3, 5)).tolist() == [4, 3, 2, 1, 0, 9, 8, 7, 6, 5, 14, 13, 12, 11, 10]


@pytest.mark.parametrize("prefix", [1, 2])
def test_consistency_terms_match_permutation_matrix_reference(prefix):
    g = torch.Generator().manual_seed(0)
    h, w = 3, 5
    t = prefix + h * w
    a1 = torch.rand(2, 4, t, t, generator=g).softmax(-1)
    a2 = torch.rand(2, 4, t, t, generator=g).softmax(-1)
    cls_term, pair_term = consistency_terms(a1, a2, (h, w), prefix)
    ref_cls, ref_pair = reference_terms(a1, a2, h, w, prefix)
    assert float(cls_term) == pytest.approx(ref_cls, rel=1e-5)
    assert float(pair_term) == pytest.approx(ref_pair, rel=1e-5)
    # Un-flipping twice is the identity; un-flipping a flipped copy of a1 aligns it exactly.
    assert torch.equal(unflip_attention(unflip_attention(a1, (h, w), prefix), (h, w), prefix), a1)
    flipped = unflip_attention(a1, (h, w), prefix)
    assert all(float(v) == 0.0 for v in consistency_terms(a1, flipped, (h, w), prefix))


def test_objective_loss_matches_separate_views_reference():
    torch.manual_seed(0)
    model = create_model("vit_nano_patch16", num_classes=3)
    x = torch.randn(2, 3, 48, 80)  # 3 x 5 tokens: a non-square grid
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    obj = build_objective({"name": "acr", "alpha": 125}, classes=None)
    loss, logs = obj(model, {"image": x, "label": labels}, step=0)

    # The authors' form: two separate forward passes, every block, head mean, flip as a permutation matrix.
    with torch.no_grad():
        o1 = model(x, capture=Capture(attn=True))
        o2 = model(x.flip(-1), capture=Capture(attn=True))
    a1 = torch.stack([a.mean(1) for a in o1.attn], 1)
    a2 = torch.stack([a.mean(1) for a in o2.attn], 1)
    ref_cls, ref_pair = reference_terms(a1, a2, 3, 5, 1)
    expected = (F.multilabel_soft_margin_loss(o1.logits, labels) + F.multilabel_soft_margin_loss(o2.logits, labels)
                + 125 * (ref_cls + ref_pair))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert logs["acr_cls"] == pytest.approx(ref_cls, rel=1e-4)
    assert logs["acr_pairs"] == pytest.approx(ref_pair, rel=1e-4)
    assert ref_cls > 0 and ref_pair > 0  # a random model is not flip-equivariant
    # The shared classification term: ``cls`` is the sum over both views (no separate ``cls_flip``).
    both = F.multilabel_soft_margin_loss(o1.logits, labels) + F.multilabel_soft_margin_loss(o2.logits, labels)
    assert logs["cls"] == pytest.approx(float(both), rel=1e-5) and "cls_flip" not in logs

    # layers=[1]: only block 1 is compared.
    one = build_objective({"name": "acr", "alpha": 10.0, "layers": [1]})
    loss1, _ = one(model, {"image": x, "label": labels}, step=0)
    c1, p1 = reference_terms(o1.attn[1].mean(1), o2.attn[1].mean(1), 3, 5, 1)
    expected1 = (F.multilabel_soft_margin_loss(o1.logits, labels) + F.multilabel_soft_margin_loss(o2.logits, labels)
                 + 10 * (c1 + p1))
    assert float(loss1.detach()) == pytest.approx(float(expected1), rel=1e-5)


def test_flip_equivariant_model_has_zero_consistency():
    torch.manual_seed(1)
    model = create_model("vit_nano_patch16", num_classes=2)
    with torch.no_grad():
        # A horizontally symmetric patch kernel and position embeddings make the flipped image's tokens the
        # original tokens with the columns reversed, so the attention is exactly flip-equivariant.
        w = model.patch_embed.proj.weight
        w.copy_((w + w.flip(-1)) / 2)
        grid = model.base_grid
        pos = model.pos_embed[:, 1:].reshape(1, *grid, -1)
        model.pos_embed[:, 1:] = ((pos + pos.flip(2)) / 2).reshape(1, grid[0] * grid[1], -1)
    x = torch.randn(2, 3, 48, 80)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    _, logs = build_objective({"name": "acr"})(model, {"image": x, "label": labels}, step=0)
    assert logs["acr_cls"] < 1e-7 and logs["acr_pairs"] < 1e-7


def test_loss_falls_on_a_tiny_model():
    torch.manual_seed(2)
    model = create_model("vit_nano_patch16", num_classes=3)
    batch = {"image": torch.randn(4, 3, 32, 48), "label": torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])}
    obj = build_objective({"name": "acr", "alpha": 125})
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses, consistency = [], []
    for step in range(8):
        loss, logs = obj(model, batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        consistency.append(logs["acr_cls"] + logs["acr_pairs"])
    assert losses[-1] < 0.7 * losses[0]
    assert consistency[-1] < consistency[0]


def test_registered_and_options_checked():
    assert get_method("acr").objective is ACRObjective
    with pytest.raises(ConfigError, match="unknown"):
        build_objective({"name": "acr", "alpah": 1})
    with pytest.raises(ConfigError, match="layers"):
        build_objective({"name": "acr", "layers": 3})
    obj = build_objective({"name": "acr", "layers": [9]})
    model = create_model("vit_nano_patch16", num_classes=2)
    with pytest.raises(ConfigError, match="out of range"):
        obj(model, {"image": torch.randn(1, 3, 32, 32), "label": torch.ones(1, 2)}, 0)


@pytest.mark.parametrize("preset,alpha", [("acr_voc", 125), ("acr_coco", 100), ("acr_camvid", 125)])
def test_presets_load_and_build(preset, alpha):
    cfg = load_config(preset, ["data.root=/data"])
    build_transforms(cfg["data"]["transforms"])
    obj = build_objective(cfg["method"])
    assert isinstance(obj, ACRObjective) and obj.alpha == alpha and obj.layers is None
    assert cfg["model"]["weights"] is None  # never a hardcoded path: given on the command line
