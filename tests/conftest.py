"""Shared test setup. Without a GPU, Triton kernels run in its interpreter: the variable must be
set before anything imports triton, so it is set here, first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import random  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def seeded():
    """Seeds python's and torch's generators from a fresh seed and prints it (pytest shows it for a
    failing test); DDPM_TEST_SEED=<seed> replays one."""
    seed = int(os.environ.get("DDPM_TEST_SEED") or random.SystemRandom().getrandbits(32))
    print(f"test seed: {seed} (replay with DDPM_TEST_SEED={seed})")
    random.seed(seed)
    torch.manual_seed(seed)
    return seed
