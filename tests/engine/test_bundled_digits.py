"""The bundled model's samples look like digits to judges trained on the real digits.

The judge is two classifiers of different kinds, fitted on 75% of scikit-learn's digits (16x16,
[-1, 1], as the model sees them): an MLP and 10-nearest-neighbours in pixel space. A sample is
recognised when both name the same digit with probability >= 0.8. One classifier alone is fooled
by smooth blobs or a blank image; the pair is not (checked below), so the bar means "looks like a
digit", not "lands somewhere in a classifier's decision region".
"""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from ddpm_engine import Engine
from ddpm_engine.data import load_digits_images

pytest.importorskip("sklearn")
CONFIDENT = 0.8


class Judge:
    def __init__(self):
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
        ok = (p_mlp.max(1) >= CONFIDENT) & (p_knn.max(1) >= CONFIDENT) & (p_knn.argmax(1) == digit)
        return ok, digit


@pytest.fixture(scope="module")
def judge():
    return Judge()


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained("digits", backend="torch", device="cpu")


def non_digits(n=200) -> dict:
    g = torch.Generator().manual_seed(0)
    blobs = F.avg_pool2d(torch.rand(n, 1, 8, 8, generator=g), 3, 1, 1)  # smooth random shapes, full contrast
    lo, hi = blobs.amin((2, 3), keepdim=True), blobs.amax((2, 3), keepdim=True)
    blobs = F.interpolate((blobs - lo) / (hi - lo) * 2 - 1, size=(16, 16), mode="bilinear", align_corners=False)
    return {"uniform noise": torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, "smooth blobs": blobs,
            "blank": -torch.ones(4, 1, 16, 16)}


def test_the_judge_knows_digits_from_non_digits(judge):
    assert judge.mlp.score(judge.x_te, judge.y_te) >= 0.95
    ok, digit = judge.recognise(judge.x_te)
    assert ok.mean() >= 0.85, f"only {ok.mean():.2f} of held-out real digits recognised"
    assert (digit[ok] == judge.y_te[ok]).mean() >= 0.99
    for name, images in non_digits().items():
        assert judge.recognise(images)[0].mean() <= 0.2, f"the judge takes {name} for digits"


@pytest.mark.parametrize("sampler,steps,n,min_recognised,min_digits", [
    ("ddim", 50, 100, 0.6, 10),
    ("ddpm", 1000, 40, 0.6, 8),  # fewer images: DDPM-1000 costs 1000 network calls
])
def test_samples_are_recognised_digits(judge, engine, sampler, steps, n, min_recognised, min_digits):
    seeds = list(range(1000, 1000 + n))  # fixed: the test is deterministic
    images = engine.sample(seeds, sampler=sampler, steps=steps)
    ok, digit = judge.recognise(images)
    found = sorted(set(digit[ok].tolist()))
    assert ok.mean() >= min_recognised, f"only {ok.mean():.2f} of {sampler}-{steps} samples are recognised digits"
    assert len(found) >= min_digits, f"{sampler}-{steps} samples cover only the digits {found}"
