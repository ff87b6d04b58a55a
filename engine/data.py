"""Training data: scikit-learn's bundled handwritten digits (real data, no download).

1,797 images of 8x8 pixels in 0..16, upsampled to 16x16 (bilinear) and scaled to [-1, 1].
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .errors import require

DIGITS_SHAPE = (1, 16, 16)


def load_digits_images(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, size, size] float32 in [-1, 1], labels int64 [N])."""
    datasets = require("sklearn.datasets", "the digits data set", extra="dev")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.tensor(digits.target, dtype=torch.int64)
