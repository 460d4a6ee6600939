"""The README's Python snippet runs as written (with the shared files for the names it uses)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_python_snippet_runs_and_localises_the_horse(shared_data, vit_tiny_weights, tmp_path):
    section = README.read_text().split("## Localisation maps in Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    # The snippet names its files as a user has them in the working directory; link the shared ones there.
    (tmp_path / "vit_tiny_patch16_224_in1k.safetensors").symlink_to(vit_tiny_weights)
    (tmp_path / "horse001.jpg").symlink_to(shared_data / "horses" / "JPEGImages" / "horse001.jpg")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    picture = np.asarray(Image.open(tmp_path / "horse001_getam.png"))
    mask = np.asarray(Image.open(shared_data / "horses" / "SegmentationClass" / "horse001.png"))
    maps = namespace["maps"]
    assert picture.shape[:2] == mask.shape and maps.shape == (1, 1, *mask.shape)
    heat = maps[0, 0].numpy()
    assert heat[mask == 1].mean() > 2 * heat[mask == 0].mean()  # the map is on the horse
    assert namespace["raw"].shape == (2, 1, 224, 224) and torch.isfinite(namespace["raw"]).all()
