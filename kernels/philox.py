"""In-kernel per-sample noise: the engine's Philox stream (engine/noise.py) inside a Triton kernel.

``tl.philox(seed, c0, c1, c2, c3, n_rounds)`` runs the raw Philox4x32 rounds with key words
k0 = seed & 0xffffffff, k1 = seed >> 32 (triton/language/random.py; it bumps the key after each
round where engine.noise bumps it before each round but the first: the same schedule). We give it
the engine's fixed KEY packed into one 64-bit integer and the counters (element, step, seed_lo,
seed_hi), then apply the engine's own uint32 -> uniform -> normal transform (not ``tl.randn``,
whose transform has changed between Triton versions). Reference: ``engine.noise.philox_normal``.

Memory traffic: none of its own; the noise is computed in registers (10 rounds of 2 32-bit
multiplies per element), so a step kernel never reads or writes a noise tensor. The debug
kernel below (tests only) reads 8 + 16 bytes per sample and writes 4 * 8 + 4 bytes per element.
"""

import triton
import triton.language as tl

from ddpm_engine.noise import KEY, PHILOX_ROUNDS

from .options import FP_FUSION

PHILOX_KEY = KEY[0] | (KEY[1] << 32)  # tl.philox's 64-bit seed: low word k0, high word k1


@triton.jit
def philox_words(element, step, seed_lo, seed_hi, KEY64: tl.constexpr, ROUNDS: tl.constexpr):
    """Raw Philox4x32 words for counters (element, step, seed_lo, seed_hi), all uint32."""
    return tl.philox(KEY64, element, step, seed_lo, seed_hi, ROUNDS)


@triton.jit
def philox_normal(element, step, seed_lo, seed_hi, KEY64: tl.constexpr, ROUNDS: tl.constexpr):
    """Standard normals (fp32): Box-Muller on the first two words, as engine.noise.uint32_to_normal."""
    r0, r1, _, _ = philox_words(element, step, seed_lo, seed_hi, KEY64, ROUNDS)
    u0 = ((r0 >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23
    u1 = (r1 >> 9).to(tl.float32) * 1.1920928955078125e-07
    # sqrt_rn: IEEE sqrt (tl.sqrt is the fast approximate one on NVIDIA); 6.28... is 2 pi in fp32
    return tl.sqrt_rn(-2.0 * tl.log(u0)) * tl.cos(6.283185307179586 * u1)


@triton.jit
def _philox_debug_kernel(seed_ptr,   # int64 [B, 2]: (low word, high word) of each sample's seed
                         step_ptr,   # int64 [B]: step counter of each sample
                         words_ptr,  # int64 [B, 4, N] out: the raw uint32 words
                         z_ptr,      # float32 [B, N] out: the normals
                         N, KEY64: tl.constexpr, ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    element = offs.to(tl.uint32)
    step = tl.load(step_ptr + b).to(tl.uint32) + tl.zeros_like(element)
    lo = tl.load(seed_ptr + 2 * b).to(tl.uint32) + tl.zeros_like(element)
    hi = tl.load(seed_ptr + 2 * b + 1).to(tl.uint32) + tl.zeros_like(element)
    r0, r1, r2, r3 = philox_words(element, step, lo, hi, KEY64, ROUNDS)
    base = words_ptr + b * 4 * N + offs
    tl.store(base, r0.to(tl.int64), mask=mask)
    tl.store(base + N, r1.to(tl.int64), mask=mask)
    tl.store(base + 2 * N, r2.to(tl.int64), mask=mask)
    tl.store(base + 3 * N, r3.to(tl.int64), mask=mask)
    tl.store(z_ptr + b * N + offs, philox_normal(element, step, lo, hi, KEY64, ROUNDS), mask=mask)


def philox_debug(seed_words, step, numel: int, block: int = 128):
    """(raw words int64 [B, 4, N], normals float32 [B, N]) from the kernel, for tests."""
    import torch

    B = seed_words.shape[0]
    step = torch.as_tensor(step, dtype=torch.int64, device=seed_words.device).expand(B).contiguous()
    words = torch.full((B, 4, numel), -1, dtype=torch.int64, device=seed_words.device)
    z = torch.full((B, numel), float("nan"), dtype=torch.float32, device=seed_words.device)
    grid = (B, triton.cdiv(numel, block))
    _philox_debug_kernel[grid](seed_words.contiguous(), step, words, z, numel, KEY64=PHILOX_KEY,
                               ROUNDS=PHILOX_ROUNDS, BLOCK=block, enable_fp_fusion=FP_FUSION)
    return words, z


def launches(t):
    """Every launch ``philox_debug`` makes (its block is fixed), on the stand-in tensors ``t``: see
    ddpm_step.launches."""
    yield lambda: philox_debug(t.seed_words, 3, t.x[0].numel())
