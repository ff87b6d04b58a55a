"""The bundled model's samples look like digits to the judge (ddpm_engine.data.DigitsJudge), and
the judge itself knows digits from non-digits."""

import pytest
import torch
from torch.nn import functional as F

from ddpm_engine import Engine
from ddpm_engine.data import DigitsJudge

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def judge():
    return DigitsJudge()


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
    pytest.param("ddpm", 1000, 40, 0.6, 8, marks=pytest.mark.slow),  # fewer images: 1000 network calls
])
def test_samples_are_recognised_digits(judge, engine, sampler, steps, n, min_recognised, min_digits):
    seeds = list(range(1000, 1000 + n))  # fixed: the test is deterministic
    images = engine.sample(seeds, sampler=sampler, steps=steps)
    ok, digit = judge.recognise(images)
    found = sorted(set(digit[ok].tolist()))
    assert ok.mean() >= min_recognised, f"only {ok.mean():.2f} of {sampler}-{steps} samples are recognised digits"
    assert len(found) >= min_digits, f"{sampler}-{steps} samples cover only the digits {found}"


def test_frechet_distance_is_the_fid_formula(test_seed):
    """Held to scipy's general matrix square root on well-conditioned data (seed printed on failure),
    and 0 between the real 8x8 digits and themselves, where pixels that never vary make the
    covariance singular."""
    import numpy as np
    from scipy import linalg
    from sklearn.datasets import load_digits

    from ddpm_engine.data import digits_pixels, frechet_distance

    rng = np.random.default_rng(test_seed)
    a, b = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)), rng.normal(1.0, 2.0, size=(500, 6))
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    want = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-8), f"TEST_SEED={test_seed}"
    real = load_digits().data.astype(np.float64)
    assert abs(frechet_distance(real, real)) < 1e-6
    as_images = torch.tensor(real, dtype=torch.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0
    assert np.allclose(digits_pixels(as_images), real, atol=1e-5)
