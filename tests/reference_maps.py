"""An independent, deliberately slow implementation of the gradient maps, for tests only.

It runs a functional ViT straight from a timm-style state dict (no code shared with wsss.models), keeps each
block's attention with ``retain_grad`` and does one backward pass per (image, class), as the authors' code does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def vit_forward(state, x, num_heads, patch=16):
    w = state["patch_embed.proj.weight"]
    tok = F.conv2d(x, w, state["patch_embed.proj.bias"], stride=patch)
    gh, gw = tok.shape[-2:]
    tok = tok.flatten(2).transpose(1, 2)
    cls = state["cls_token"].expand(x.shape[0], -1, -1)
    tok = torch.cat([cls, tok], 1) + state["pos_embed"]
    attns = []
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
        a.retain_grad()
        attns.append(a)
        o = torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, -1)
        tok = tok + F.linear(o, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        h = F.layer_norm(tok, tok.shape[-1:], state[p + "norm2.weight"], state[p + "norm2.bias"], 1e-6)
        h = F.linear(F.gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
                     state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        tok = tok + h
        i += 1
    tok = F.layer_norm(tok, tok.shape[-1:], state["norm.weight"], state["norm.bias"], 1e-6)
    logits = F.linear(tok[:, 0], state["head.weight"], state["head.bias"])
    return logits, attns, (gh, gw)


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
