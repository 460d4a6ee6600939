"""An independent, deliberately slow implementation of the localisation maps, for tests only.

It runs a functional ViT straight from a timm-style state dict (no code shared with wsss.models), keeps each
block's attention with ``retain_grad`` and does one backward pass per (image, class), as the authors' code does.
Multi-scale / flip aggregation is written out view by view (:func:`reference_localize`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _position_embedding(state, grid, num_prefix, base_grid):
    pos = state["pos_embed"]
    n = pos.shape[1] - num_prefix
    if base_grid is None and n == grid[0] * grid[1]:
        return pos  # the stored grid (a non-square one needs base_grid only when the input grid differs)
    if base_grid is None:
        side = math.isqrt(n)
        base_grid = (side, side)
    if tuple(grid) == tuple(base_grid):
        return pos
    patches = pos[:, num_prefix:].reshape(1, base_grid[0], base_grid[1], -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([pos[:, :num_prefix], patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], 1)


def run_vit(state, x, num_heads, patch=16, head="token", base_grid=None):
    """Everything one forward pass gives, as a dict: ``logits``, ``tokens`` (after the final norm), ``attns`` (each
    block's post-softmax attention, gradients retained), ``hidden`` (each block's output), ``grid``, ``num_prefix``
    and, for the ``mct`` head, the conv ``cam`` (K, h, w) of the first image.

    ``head`` is ``token`` (a linear layer on the class token) or ``mct`` (one class token per class, logits their
    channel mean, a 3x3 conv on the patch map for the CAM).
    """
    w = state["patch_embed.proj.weight"]
    tok = F.conv2d(x, w, state["patch_embed.proj.bias"], stride=patch)
    gh, gw = tok.shape[-2:]
    tok = tok.flatten(2).transpose(1, 2)
    num_prefix = state["cls_token"].shape[1]
    cls = state["cls_token"].expand(x.shape[0], -1, -1)
    tok = torch.cat([cls, tok], 1) + _position_embedding(state, (gh, gw), num_prefix, base_grid)
    attns, hidden = [], []
    i = 0
    while f"blocks.{i}.norm1.weight" in state:
        p = f"blocks.{i}."
        h = F.layer_norm(tok, tok.shape[-1:], state[p + "norm1.weight"], state[p + "norm1.bias"], 1e-6)
        qkv = F.linear(h, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        b, t, _ = qkv.shape
        d = tok.shape[-1] // num_heads
        q, k, v = qkv.view(b, t, 3, num_heads, d).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        a = torch.softmax(scores, -1)
        if a.requires_grad:
            a.retain_grad()
        attns.append(a)
        o = torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, -1)
        tok = tok + F.linear(o, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        h = F.layer_norm(tok, tok.shape[-1:], state[p + "norm2.weight"], state[p + "norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
                     state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        tok = tok + h
        hidden.append(tok)
        i += 1
    if head != "mct":  # MCTformer-V2 reads block 11's raw output
        tok = F.layer_norm(tok, tok.shape[-1:], state["norm.weight"], state["norm.bias"], 1e-6)
    out = {"tokens": tok, "attns": attns, "hidden": hidden, "grid": (gh, gw), "num_prefix": num_prefix}
    if head == "token":
        out["logits"] = F.linear(tok[:, 0], state["head.weight"], state["head.bias"])
    elif head == "mct":
        out["logits"] = tok[:, :num_prefix].mean(-1)
        patch_map = tok[:1, num_prefix:].transpose(1, 2).reshape(1, -1, gh, gw)
        out["cam"] = F.conv2d(patch_map, state["head.weight"], state["head.bias"], padding=1)[0]
    else:
        raise ValueError(head)
    return out


def vit_forward(state, x, num_heads, patch=16):
    """``(logits, attentions, grid)`` of a class-token ViT."""
    out = run_vit(state, x, num_heads, patch)
    return out["logits"], out["attns"], out["grid"]


def reference_maps(state, image, classes, method, num_heads, start_layer=None, grad_power=2, patch=16):
    """Maps of one image (1, 3, H, W) for each class, upsampled (align_corners=True) and min-max normalised."""
    out = []
    for c in classes:
        logits, attns, (gh, gw) = vit_forward(state, image.clone().requires_grad_(True), num_heads, patch)
        depth = len(attns)
        if method == "rollout":
            r = torch.eye(attns[0].shape[-1])
            for a in attns:
                m = a[0].detach().mean(0)
                m = 0.5 * m + 0.5 * torch.eye(m.shape[0])  # (A + I) / 2 equals (A + I) row-normalised
                r = m @ r
            row = r[0, 1:]
        else:
            logits[0, c].backward()
            if method == "getam":
                s0 = depth // 2 if start_layer is None else start_layer
                acc = torch.zeros_like(attns[0][0, 0])
                for a in attns[s0:]:
                    g = a.grad[0]
                    term = torch.clamp(g * a[0].detach(), min=0).mean(0)
                    if grad_power == 2:
                        term = term * torch.clamp(g, min=0).mean(0)
                    acc = acc + term
                row = torch.clamp(acc[0, 1:], min=0)
            elif method == "acr":
                s0 = depth - 2 if start_layer is None else start_layer
                acc = sum(torch.clamp(a.grad[0], min=0).mean(0) for a in attns[s0:])
                g = torch.clamp(acc[0, 1:], min=0)
                aff = sum(a[0].detach().mean(0)[1:, 1:] for a in attns)
                row = aff @ g
            else:
                raise ValueError(method)
        m = row.reshape(1, 1, gh, gw)
        m = F.interpolate(m, size=image.shape[-2:], mode="bilinear", align_corners=True)[0, 0]
        m = (m - m.min()) / (m.max() - m.min() + 1e-6)
        out.append(m.detach())
    return torch.stack(out)


# ------------------------------------------------------------------------------ CAM, Grad-CAM, AReAM, any view


def _patch_cam(state, out, c, head):
    """ReLU of class c's activation on the patch tokens of the first image, (h, w)."""
    if head == "mct":
        return out["cam"][c].relu()
    p = out["num_prefix"]
    weight = state["head.weight"][c]
    values = torch.stack([torch.dot(weight, token) for token in out["tokens"][0, p:]])
    return values.relu().reshape(out["grid"])


def cam_view(state, view, c, num_heads, patch, head="token", base_grid=None):
    """CAM: the classifier weights of class c on the final-normed patch tokens, ReLU."""
    with torch.no_grad():
        out = run_vit(state, view, num_heads, patch, head, base_grid)
    return _patch_cam(state, out, c, head)


def gradcam_view(state, view, c, num_heads, patch, head="token", base_grid=None):
    """Grad-CAM on the tokens entering the last block: channel weights = spatial mean of d logit_c / d tokens."""
    out = run_vit(state, view.detach().requires_grad_(True), num_heads, patch, head, base_grid)
    acts = out["hidden"][-2]
    (grad,) = torch.autograd.grad(out["logits"][0, c], acts)
    p = out["num_prefix"]
    acts, grad = acts[0, p:].detach(), grad[0, p:]
    channel_weights = grad.sum(0) / grad.shape[0]
    values = torch.stack([(channel_weights * token).sum() for token in acts])
    return values.relu().reshape(out["grid"])


def aream_view(state, view, c, num_heads, patch, head="token", base_grid=None, layers=None, layer_weights=None):
    """AReAM: the CAM (MCT: times class c's head-mean class-to-patch attention averaged over every block) refined
    by the weighted mean over the first ``layers`` blocks (None: all) of the head-mean patch-to-patch attention."""
    with torch.no_grad():
        out = run_vit(state, view, num_heads, patch, head, base_grid)
    p = out["num_prefix"]
    cam = _patch_cam(state, out, c, head).flatten()
    attns = [a[0] for a in out["attns"]]
    if head == "mct":
        cls_attn = torch.zeros_like(cam)
        for a in attns:
            for h in range(a.shape[0]):
                cls_attn += a[h, c, p:] / (a.shape[0] * len(attns))
        cam = cam * cls_attn
    chosen = attns if layers is None else attns[:layers]
    n = cam.numel()
    affinity = torch.zeros(n, n, dtype=cam.dtype)
    for i, a in enumerate(chosen):
        w = 1.0 if layer_weights is None else float(layer_weights[i])
        for h in range(a.shape[0]):
            affinity += w * a[h, p:, p:] / (a.shape[0] * len(chosen))
    refined = torch.stack([sum(affinity[m, k] * cam[k] for k in range(n)) for m in range(n)])
    return refined.reshape(out["grid"])


VIEW_MAPS = {"cam": (cam_view, True), "gradcam": (gradcam_view, True), "aream": (aream_view, False)}
"""method -> (map of one view on the patch grid, align_corners of its upsampling)."""


def reference_localize(state, images, classes, method, num_heads, patch, scales=(1.0,), flip=False, head="token",
                       base_grid=None, **options):
    """Maps (B, K, H, W) of ``classes`` (B, K; -1 = an unused slot, an empty map), view by view: every scale (the
    sides must be exact multiples of the patch) and its mirror image, each map upsampled bilinearly to H x W, the
    mirrored ones flipped back, summed, ReLU, min-max normalised (eps 1e-6)."""
    view_map, align = VIEW_MAPS[method]
    b, _, height, width = images.shape
    result = torch.zeros(b, len(classes[0]), height, width, dtype=images.dtype)
    for i in range(b):
        for k, c in enumerate(classes[i]):
            if c < 0:
                continue
            total = torch.zeros(height, width, dtype=images.dtype)
            for s in scales:
                size = (int(height * s), int(width * s))
                assert size[0] % patch == 0 and size[1] % patch == 0 and size[0] == height * s, (s, size)
                view = images[i : i + 1]
                if size != (height, width):
                    view = F.interpolate(view, size=size, mode="bilinear", align_corners=False)
                for mirrored in ((False, True) if flip else (False,)):
                    m = view_map(state, view.flip(-1) if mirrored else view, c, num_heads, patch, head, base_grid,
                                 **options)
                    m = F.interpolate(m[None, None], size=(height, width), mode="bilinear", align_corners=align)
                    total += m[0, 0].flip(-1) if mirrored else m[0, 0]
            total = total.clamp(min=0)
            result[i, k] = (total - total.min()) / (total.max() - total.min() + 1e-6)
    return result
