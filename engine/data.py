"""The digits data set and its judge: scikit-learn's bundled handwritten digits (no download).

1,797 images of 8x8 pixels in 0..16, upsampled to 16x16 (bilinear) and scaled to [-1, 1].

``DigitsJudge`` tells whether samples look like digits: two classifiers of different kinds,
fitted on 75% of the digits as the model sees them, an MLP and 10-nearest-neighbours in pixel
space. A sample is recognised when both name the same digit with probability >= 0.8. One
classifier alone is fooled by smooth blobs or a blank image; the pair is not
(tests/engine/test_bundled_digits.py checks it), so the bar means "looks like a digit".
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from .errors import require


def load_digits_images(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, size, size] float32 in [-1, 1], labels int64 [N])."""
    datasets = require("sklearn.datasets", "the digits data set", extra="dev")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1), torch.tensor(digits.target, dtype=torch.int64)


class DigitsJudge:
    """``ok, digit = DigitsJudge().recognise(images)``: recognised [N] bool and digit [N]."""

    CONFIDENT = 0.8

    def __init__(self):
        require("sklearn", "the digits judge", extra="dev")
        from sklearn.model_selection import train_test_split
        from sklearn.neighbors import KNeighborsClassifier
        from sklearn.neural_network import MLPClassifier

        x, y = load_digits_images()
        x_tr, self.x_te, y_tr, self.y_te = train_test_split(x.flatten(1).numpy(), y.numpy(), test_size=0.25,
                                                            random_state=0, stratify=y.numpy())
        self.mlp = MLPClassifier((128,), max_iter=1000, random_state=0).fit(x_tr, y_tr)
        self.knn = KNeighborsClassifier(10).fit(x_tr, y_tr)

    def recognise(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(recognised [N] bool, digit [N]) for images [N, 1, 16, 16] (tensor) or [N, 256] (array)."""
        x = images.flatten(1).cpu().numpy() if isinstance(images, torch.Tensor) else images
        p_mlp, p_knn = self.mlp.predict_proba(x), self.knn.predict_proba(x)
        digit = p_mlp.argmax(1)
        ok = (p_mlp.max(1) >= self.CONFIDENT) & (p_knn.max(1) >= self.CONFIDENT) & (p_knn.argmax(1) == digit)
        return ok, digit
