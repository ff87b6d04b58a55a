"""Random inputs for the kernel tests, and the reference step with the engine's noise."""

import random

import torch

from ddpm_engine.kernels.common import PREDICTION_CODE
from ddpm_engine.noise import philox_normal, seed_words
from ddpm_engine.schedules import Tables, make_betas

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
__all__ = ["DEVICE", "PREDICTION_CODE", "random_case", "reference_noise", "poisoned", "with_variance_part"]


def random_case(B=5, shape=(3, 5, 7), steps=None, schedule=None, dtype=torch.float32, spacing="leading"):
    """Tables, x, model output, mixed per-sample step indices (always including 0 and the first
    step), and seed words — all fresh random."""
    schedule = schedule or random.choice(["linear", "cosine"])
    steps = steps or random.choice([999 if spacing == "linspace" else 1000, 50, 17])
    tables = Tables.build(make_betas(schedule, 1000), steps, spacing)
    tab = tables.on(DEVICE)
    x = torch.randn(B, *shape, device=DEVICE).to(dtype)
    out = torch.randn(B, *shape, device=DEVICE).to(dtype)
    i = torch.tensor([0, steps - 1] + [random.randrange(steps) for _ in range(B - 2)], device=DEVICE)
    words = seed_words([random.getrandbits(64) for _ in range(B)], DEVICE)
    return tab, x, out, i, words


def reference_noise(words, i, like):
    return philox_normal(words, i, like[0].numel()).reshape(like.shape)


def poisoned(like, dtype=None):
    return torch.full_like(like, float("nan"), dtype=dtype or like.dtype)


def with_variance_part(out, variance):
    """The 2C-channel output of a model with a learned variance: ``out`` then a fresh random variance
    part (for "learned" the variance itself, positive; for "learned_range" v in [-1, 1]); ``out``
    itself for a fixed variance."""
    if not variance.learned:
        return out
    v = torch.rand_like(out.float())
    v = 0.05 * v + 1e-4 if variance.value == "learned" else 2 * v - 1
    return torch.cat([out, v.to(out.dtype)], 1)
