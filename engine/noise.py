"""Per-sample, counter-based Gaussian noise: Philox4x32-10 (Salmon et al., SC'11, "Random123").

Noise belongs to the sample, not to the batch. Element ``e`` (flat index inside one sample,
C*H*W of them) of the noise drawn at step ``s`` for a sample with 64-bit seed ``seed`` is

    r0, r1, r2, r3 = philox4x32_10(counter=(e, s, seed & 0xffffffff, seed >> 32), key=KEY)
    u0 = ((r0 >> 9) + 0.5) * 2**-23          # in (0, 1): log(u0) is finite
    u1 = (r1 >> 9) * 2**-23                  # in [0, 1)
    z  = sqrt(-2 log u0) * cos(2 pi u1)      # Box-Muller, one normal per counter, fp32

so a seed gives the same noise whatever the batch size, its position in the batch or the
device (up to the rounding of log/cos). The step counter ``s`` is the per-sample step index i
of the step being taken (see schedules.Tables); x_T uses ``s = XT_STEP``, and the stochastic
DPM-Solver++ (dpmpp_2m_sde) draws at ``s = SDE_STEP + i``, counters no other sampler uses, so its
noise is not DDPM's or DDIM's noise of the same seed. The Triton kernels
(kernels/) compute the same stream with ``tl.philox`` (raw rounds, same counters, same key)
and the same transform written out by hand.

The torch implementation below emulates uint32 arithmetic in int64 (products are split into
16-bit halves so nothing overflows), so it runs on any device torch supports.
"""

from __future__ import annotations

import math

import torch

from .errors import InvalidRequestError, quote

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # golden ratio
PHILOX_W1 = 0xBB67AE85  # sqrt(3) - 1
PHILOX_ROUNDS = 10
KEY = (0x5EED0DDB, 0x0D1FF05E)  # fixed key of the engine's stream; never change it
XT_STEP = 0xFFFFFFFF  # step counter used for the initial noise x_T
SDE_STEP = 0x80000000  # dpmpp_2m_sde's step counters are SDE_STEP + i (i < 2**31 - 1, so never XT_STEP)
MASK32 = 0xFFFFFFFF
SEED_LIMIT = 1 << 64


def _mulhilo32(a: torch.Tensor, m: int):
    """(hi, lo) 32-bit words of a * m for uint32 values held in int64, without overflow."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    p = a * m_lo  # < 2**48
    q = a * m_hi  # < 2**48
    hi = (q + (p >> 16)) >> 16
    lo = (((q & 0xFFFF) << 16) + p) & MASK32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = PHILOX_ROUNDS):
    """Raw Philox4x32 rounds on int64 tensors holding uint32 values (broadcasting); the key words
    k0, k1 are Python ints, so the key schedule is host arithmetic and nothing is copied to the
    device (a host->device copy per round would sync, and is illegal during CUDA-graph capture)."""
    k0, k1 = int(k0) & MASK32, int(k1) & MASK32
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo32(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uint32_to_normal(r0: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
    """The engine's uint32 -> uniform -> normal transform, in float32 (see module docstring)."""
    u0 = ((r0 >> 9).to(torch.float32) + 0.5) * (2.0**-23)
    u1 = (r1 >> 9).to(torch.float32) * (2.0**-23)
    return torch.sqrt(-2.0 * torch.log(u0)) * torch.cos((2.0 * math.pi) * u1)


def check_seeds(seeds) -> list[int]:
    """Validate a list of seeds (ints in [0, 2**64)); returns them as Python ints."""
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()
    if isinstance(seeds, (str, bytes)):  # list("12") would be seeds '1' and '2'
        raise InvalidRequestError(f"seeds must be a list of integers, got a {type(seeds).__name__}: {quote(seeds)}")
    try:
        seeds = list(seeds)
    except TypeError:
        raise InvalidRequestError(f"seeds must be a list of integers, got {type(seeds).__name__}") from None
    if not seeds:
        raise InvalidRequestError("seeds must not be empty: ask for at least one image")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < SEED_LIMIT:
            raise InvalidRequestError(f"each seed must be an integer in [0, 2**64), got {quote(s)}")
    return [int(s) for s in seeds]


def seed_words(seeds, device=None) -> torch.Tensor:
    """Seeds (already checked at the API boundary with ``check_seeds``) as an int64 tensor [B, 2]
    of (low word, high word), each a uint32 value."""
    return torch.tensor([[s & MASK32, s >> 32] for s in seeds], dtype=torch.int64, device=device)


def philox_normal(seed_words: torch.Tensor, step: torch.Tensor | int, numel: int) -> torch.Tensor:
    """Standard normal noise [B, numel] (float32) for each sample's seed at its step counter.

    seed_words: int64 [B, 2] from ``seed_words``; step: int or int64 tensor [B] (uint32 values).
    """
    device = seed_words.device
    B = seed_words.shape[0]
    element = torch.arange(numel, dtype=torch.int64, device=device).unsqueeze(0)  # [1, N]
    if isinstance(step, torch.Tensor):
        step = step.to(device=device, dtype=torch.int64).reshape(-1, 1) & MASK32  # [B or 1, 1]
    else:  # a fill on the device, not a copy from the host
        step = torch.full((1, 1), int(step) & MASK32, dtype=torch.int64, device=device)
    lo = seed_words[:, 0:1]
    hi = seed_words[:, 1:2]
    c0 = element.expand(B, numel)
    c1 = step.expand(B, numel)
    c2 = lo.expand(B, numel)
    c3 = hi.expand(B, numel)
    r0, r1, _, _ = philox4x32(c0, c1, c2, c3, KEY[0], KEY[1])
    return uint32_to_normal(r0, r1)


def initial_noise(seed_words: torch.Tensor, sample_shape) -> torch.Tensor:
    """x_T for each seed: [B, *sample_shape] float32, drawn at step counter XT_STEP."""
    numel = math.prod(sample_shape)
    return philox_normal(seed_words, XT_STEP, numel).reshape(seed_words.shape[0], *sample_shape)
