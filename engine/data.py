"""The digits data set and its judge: scikit-learn's bundled handwritten digits (no download).

1,797 images of 8x8 pixels in 0..16, upsampled to 16x16 (bilinear) and scaled to [-1, 1].

``DigitsJudge`` tells whether samples look like digits: two classifiers of different kinds,
fitted on 75% of the digits as the model sees them, an MLP and 10-nearest-neighbours in pixel
space. A sample is recognised when both name the same digit with probability >= 0.8. One
classifier alone is fooled by smooth blobs or a blank image; the pair is not
(tests/engine/test_bundled_digits.py checks it), so the bar means "looks like a digit".

A recognition rate saturates (5-step samplers score like DDPM-1000); a distance to the real data
does not. ``frechet_distance(images)``: the Fréchet distance between Gaussians fitted to the
samples and to all 1,797 real digits, in their own 64-pixel space (samples pooled back to 8x8 and
scaled to 0..16): ||mu_s - mu_r||^2 + Tr(S_s + S_r - 2 (S_s S_r)^(1/2)) (the FID formula on
pixels; lower is better). The training images themselves score about 150, not 0: upsampling to
16x16 and pooling back blurs them.
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


def digits_pixels(images) -> np.ndarray:
    """Images [N, 1, H, W] in [-1, 1] as the real digits' features: [N, 64] float64, 8x8 (average
    pooled) in 0..16."""
    x = torch.as_tensor(images, dtype=torch.float32).cpu()
    x = F.adaptive_avg_pool2d((x.clamp(-1, 1) + 1) * 8.0, (8, 8)) if x.shape[-1] != 8 else (x.clamp(-1, 1) + 1) * 8.0
    return x.flatten(1).double().numpy()


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(w.clip(min=0.0))) @ v.T


def frechet_distance(features: np.ndarray, reference: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets [N, D] (the FID formula).
    Tr (S1 S2)^(1/2) is taken as Tr (A S2 A)^(1/2), A = S1^(1/2): the same eigenvalues, and a
    symmetric matrix, so singular covariances (pixels that never vary) are exact, not a warning."""
    mu1, mu2 = features.mean(0), reference.mean(0)
    s1, s2 = np.cov(features, rowvar=False), np.cov(reference, rowvar=False)
    a = _psd_sqrt(s1)
    cross = np.sqrt(np.linalg.eigvalsh(a @ s2 @ a).clip(min=0.0)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * cross)


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

    def frechet_distance(self, images) -> float:
        """The Fréchet distance of ``images`` [N, 1, H, W] in [-1, 1] to all the real 8x8 digits (module doc)."""
        datasets = require("sklearn.datasets", "the digits data set", extra="dev")
        return frechet_distance(digits_pixels(images), datasets.load_digits().data.astype(np.float64))

    def recognise(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(recognised [N] bool, digit [N]) for images [N, 1, 16, 16] (tensor) or [N, 256] (array)."""
        x = images.flatten(1).cpu().numpy() if isinstance(images, torch.Tensor) else images
        p_mlp, p_knn = self.mlp.predict_proba(x), self.knn.predict_proba(x)
        digit = p_mlp.argmax(1)
        ok = (p_mlp.max(1) >= self.CONFIDENT) & (p_knn.max(1) >= self.CONFIDENT) & (p_knn.argmax(1) == digit)
        return ok, digit
