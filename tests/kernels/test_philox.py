"""In-kernel Philox against the engine's torch generator: raw words bitwise, normals to rounding."""

import random

import torch

from ddpm_engine.noise import KEY, XT_STEP, philox4x32, philox_normal, seed_words
from ddpm_engine.kernels.philox import philox_debug

from .helpers import DEVICE


def test_kernel_words_and_normals_match_the_cpu_generator():
    B, N = 4, random.choice([77, 130, 300])  # not a multiple of the block
    words = seed_words([random.getrandbits(64) for _ in range(B - 1)] + [2**64 - 1], DEVICE)
    step = torch.tensor([0, 1, random.randrange(1000), XT_STEP], device=DEVICE)
    raw, z = philox_debug(words, step, N, block=64)
    e = torch.arange(N, device=DEVICE).expand(B, N)
    ref = philox4x32(e, step.view(-1, 1).expand(B, N), words[:, :1].expand(B, N), words[:, 1:].expand(B, N), *KEY)
    for k in range(4):
        assert torch.equal(raw[:, k], ref[k]), f"word {k}"
    z_ref = torch.cat([philox_normal(words[b:b + 1], int(step[b]), N) for b in range(B)])
    assert not torch.isnan(z).any()
    # a few ulp of log/cos in the interpreter (measured max 4.8e-7); a GPU's log/cos may differ more
    tol = 1e-6 if DEVICE == "cpu" else 1e-5
    torch.testing.assert_close(z, z_ref, rtol=tol, atol=tol)
