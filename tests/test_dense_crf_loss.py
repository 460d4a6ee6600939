"""GETAM's dense-CRF regulariser against a brute-force loop over pixel pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsss.train.dense_crf_loss import DenseCRFLoss, bilateral_filter, dense_crf_energy


def _reference(images, probs, roi, labels, sigma_rgb, sigma_xy):
    """The energy and the authors' gradient, pixel pair by pixel pair, in float64 numpy."""
    b, k, h, w = probs.shape
    img, p, r = images.double().numpy(), probs.double().numpy(), roi.double().numpy()
    energy, grad = 0.0, np.zeros_like(p)
    pixels = [(y, x) for y in range(h) for x in range(w)]
    for n in range(b):
        inside = p[n] * r[n]
        gate = np.clip(r[n] - p[n].max(axis=0), 0, None)
        gate[labels[n].numpy() == 255] = 1.0
        filtered = np.zeros_like(inside)
        for (yi, xi) in pixels:
            for (yj, xj) in pixels:
                d_xy = ((yi - yj) ** 2 + (xi - xj) ** 2) / sigma_xy**2
                d_rgb = ((img[n, :, yi, xi] - img[n, :, yj, xj]) ** 2).sum() / sigma_rgb**2
                filtered[:, yi, xi] += math.exp(-0.5 * (d_xy + d_rgb)) * inside[:, yj, xj]
        weighted = filtered * gate
        energy -= (inside * weighted).sum()
        grad[n] = -2 * weighted * r[n]
    return energy / b, grad / b


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 6, 5), generator=g).float()
    probs = torch.randn(2, 4, 6, 5, generator=g).softmax(dim=1)
    roi = torch.ones(2, 6, 5)
    roi[1, :, 4] = 0  # the padded column of a crop
    labels = torch.randint(0, 4, (2, 6, 5), generator=g)
    labels[0, 2:4, 1:3] = 255
    return images, probs, roi, labels


def test_energy_and_gradient_equal_the_pairwise_loop(batch):
    images, probs, roi, labels = batch
    probs = probs.clone().requires_grad_(True)
    energy = dense_crf_energy(images, probs, roi, labels, sigma_rgb=40.0, sigma_xy=3.0)
    energy.backward()
    ref_energy, ref_grad = _reference(images, probs.detach(), roi, labels, 40.0, 3.0)
    assert energy.item() == pytest.approx(ref_energy, rel=1e-5)
    np.testing.assert_allclose(probs.grad.numpy(), ref_grad, rtol=1e-4, atol=1e-6)
    assert np.abs(ref_grad[1, :, :, 4]).max() == 0  # nothing outside the ROI


def test_ungated_gradient_is_the_true_one_and_tiles_do_not_matter(batch):
    images, probs, roi, _ = batch
    roi = torch.ones_like(roi)
    unlabelled = torch.full(roi.shape, 255)  # gate 1 everywhere: the energy is a plain quadratic form
    probs = probs.clone().requires_grad_(True)
    dense_crf_energy(images, probs, roi, unlabelled, 40.0, 3.0).backward()
    exact = probs.detach().clone().requires_grad_(True)
    (-(exact * bilateral_filter(images, exact, 40.0, 3.0)).sum() / 2).backward()  # autograd through W
    torch.testing.assert_close(probs.grad, exact.grad, rtol=1e-5, atol=1e-6)
    values = torch.rand(2, 3, 6, 5)
    torch.testing.assert_close(bilateral_filter(images, values, 15.0, 2.0, tile=7),
                               bilateral_filter(images, values, 15.0, 2.0), rtol=1e-4, atol=1e-4)


def test_getam_scaling_and_weight(batch):
    images, probs, roi, labels = batch
    big = [torch.nn.functional.interpolate(t, scale_factor=2, mode="nearest") for t in
           (images, probs, roi[:, None], labels[:, None].float())]
    loss = DenseCRFLoss(weight=1e-7, sigma_rgb=15, sigma_xy=100, scale=0.5)
    value = loss(big[0], big[1], big[2][:, 0], big[3][:, 0].long())
    # Half of a 2x nearest upsampling is the original; the probabilities come back bilinearly, i.e. nearly equal.
    expected = 1e-7 * dense_crf_energy(images, probs, roi, labels, 15, 50)
    assert value.item() == pytest.approx(expected.item(), rel=0.05)
    assert value.item() < 0
    with pytest.raises(ValueError, match="roi"):
        dense_crf_energy(images, probs, roi[:, :3], labels)


def test_a_24x32_image_against_the_explicit_kernel_matrix():
    """The issue's size: N = 768 pixels, the kernel as one explicit N x N float64 matrix."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 24, 32), generator=g).float()
    probs = torch.randn(2, 5, 24, 32, generator=g).softmax(dim=1).requires_grad_(True)
    roi = torch.ones(2, 24, 32)
    roi[0, 20:] = 0
    labels = torch.randint(0, 5, (2, 24, 32), generator=g)
    labels[1, :6, :6] = 255
    energy = dense_crf_energy(images, probs, roi, labels, sigma_rgb=15.0, sigma_xy=50.0)
    energy.backward()
    ys, xs = np.mgrid[0:24, 0:32]
    total, grad = 0.0, np.zeros((2, 5, 24, 32))
    for b in range(2):
        f = np.concatenate([np.stack([ys, xs]).reshape(2, -1) / 50.0,
                            images[b].double().numpy().reshape(3, -1) / 15.0]).T  # (N, 5)
        kernel = np.exp(-0.5 * ((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))  # (N, N)
        p = probs[b].detach().double().numpy().reshape(5, -1) * roi[b].numpy().reshape(1, -1)
        gate = np.clip(roi[b].numpy().reshape(-1) - probs[b].detach().double().numpy().reshape(5, -1).max(0), 0, None)
        gate[labels[b].numpy().reshape(-1) == 255] = 1.0
        weighted = (p @ kernel.T) * gate
        total -= (p * weighted).sum()
        grad[b] = (-2 * weighted * roi[b].numpy().reshape(1, -1)).reshape(5, 24, 32)
    assert energy.item() == pytest.approx(total / 2, rel=1e-5)
    np.testing.assert_allclose(probs.grad.numpy(), grad / 2, rtol=1e-4, atol=1e-5)
