"""Turn samples in [-1, 1] (NCHW float) into uint8 arrays, PIL images and PNG grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

SEEDS_KEY = "seeds"  # PNG text entry: the grid's seeds, space-separated, in grid order


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C]."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def to_pil(images: torch.Tensor) -> list:
    """One PIL image per sample (mode "L" for one channel, "RGB" for three)."""
    from PIL import Image

    arr = to_uint8(images)
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arr]


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, scale: int = 1) -> np.ndarray:
    """Tile [B, C, H, W] into one uint8 [H', W', C] image, ``nrow`` images per row."""
    arr = to_uint8(images)
    b, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.zeros((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), dtype=np.uint8)
    for k in range(b):
        r, col = divmod(k, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = arr[k]
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def save_grid(images: torch.Tensor, path, nrow: int | None = None, scale: int = 1, seeds=None,
              text: dict | None = None) -> Path:
    """Write a PNG grid of the samples; returns the path. ``seeds`` (the images' seeds, in grid
    order) and ``text`` ({key: value}) go into the PNG's text metadata: ``read_png_text(path)``."""
    from PIL import Image, PngImagePlugin

    grid = make_grid(images, nrow=nrow, scale=scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    entries = dict(text or {})
    if seeds is not None:
        entries[SEEDS_KEY] = " ".join(str(int(s)) for s in seeds)
    for key, value in entries.items():
        info.add_text(key, str(value))
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path, pnginfo=info)
    return path


def read_png_text(path) -> dict:
    """A PNG's text metadata ({key: value}), as ``save_grid`` wrote it; seeds: ``SEEDS_KEY``."""
    from PIL import Image

    with Image.open(path) as image:
        return dict(image.text)
