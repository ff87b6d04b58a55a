"""Fused DDIM step (Song et al. 2021, eq. 12), any eta, noise generated inside.

Reference (engine.samplers.ddim_step), per element of sample b at step index i:

    x0, eps = from the model output; if clipping: x0 = clamp(x0), eps = (srecip x - x0) / srecipm1
    sigma   = eta * sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))        (eq. 16)
    x_prev  = sqrt(abar_prev) x0 + sqrt(max(1 - abar_prev - sigma^2, 0)) eps + sigma z

Memory traffic per element, s = itemsize of the I/O dtype: read x_t and the model output (2 s),
write x_prev (s), plus s for x0 only when STORE_X0: 3 s bytes (12 in fp32). Per sample: i (8
bytes), seed words (16), 6 table entries (24). With eta == 0 (HAS_NOISE false) no noise is drawn.
"""

import torch
import triton
import triton.language as tl

from ddpm_engine.noise import PHILOX_ROUNDS
from ddpm_engine.schedules import COLUMNS

from .ddpm_step import PRED_EPSILON, block_for, check_inputs, predict_x0
from .philox import PHILOX_KEY, philox_normal


@triton.jit
def _ddim_step_kernel(
    x_ptr,        # [B, N] x_t
    out_ptr,      # [B, N] model output
    xprev_ptr,    # [B, N] out: x_{t-1}
    x0_ptr,       # [B, N] out: predicted x0 (only when STORE_X0)
    i_ptr,        # int64 [B]: step indices (read only)
    seed_ptr,     # int64 [B, 2]: seed words
    table_ptr,    # fp32 [steps, NCOLS]: packed coefficient table
    N, eta,
    NCOLS: tl.constexpr, C_SA: tl.constexpr, C_S1MA: tl.constexpr, C_SRECIP: tl.constexpr,
    C_SRECIPM1: tl.constexpr, C_ABAR: tl.constexpr, C_ABAR_PREV: tl.constexpr,
    PRED: tl.constexpr, CLIP: tl.constexpr, STORE_X0: tl.constexpr, HAS_NOISE: tl.constexpr,
    KEY64: tl.constexpr, ROUNDS: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    i = tl.load(i_ptr + b)
    row = table_ptr + i * NCOLS
    sa = tl.load(row + C_SA)
    s1ma = tl.load(row + C_S1MA)
    srecip = tl.load(row + C_SRECIP)
    srecipm1 = tl.load(row + C_SRECIPM1)
    abar = tl.load(row + C_ABAR)
    abar_prev = tl.load(row + C_ABAR_PREV)

    base = b.to(tl.int64) * N + offs
    x = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + base, mask=mask, other=0.0).to(tl.float32)
    x0 = predict_x0(x, out, sa, s1ma, srecip, srecipm1, PRED)
    if PRED == 0:
        eps = out
    elif PRED == 1:
        eps = (x - sa * x0) / s1ma
    else:
        eps = sa * out + s1ma * x
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
        eps = (srecip * x - x0) / srecipm1
    x_prev = tl.sqrt_rn(abar_prev) * x0
    if HAS_NOISE:
        sigma = eta * tl.sqrt_rn((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
        element = offs.to(tl.uint32)
        zero = tl.zeros_like(element)
        lo = tl.load(seed_ptr + 2 * b).to(tl.uint32) + zero
        hi = tl.load(seed_ptr + 2 * b + 1).to(tl.uint32) + zero
        z = philox_normal(element, i.to(tl.uint32) + zero, lo, hi, KEY64, ROUNDS)
        x_prev += tl.sqrt_rn(tl.maximum(1.0 - abar_prev - sigma * sigma, 0.0)) * eps + sigma * z
    else:
        x_prev += tl.sqrt_rn(tl.maximum(1.0 - abar_prev, 0.0)) * eps
    tl.store(xprev_ptr + base, x_prev.to(xprev_ptr.dtype.element_ty), mask=mask)
    if STORE_X0:
        tl.store(x0_ptr + base, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def ddim_step(x, model_output, i, seed_words, table, *, eta: float = 0.0, prediction: int = PRED_EPSILON,
              clip_denoised: bool = False, x_prev=None, x0=None, store_x0: bool = True, block: int | None = None):
    """Launch the fused DDIM step (``i`` is not advanced here; see ddpm_step.advance). Arguments
    and return value as ddpm_step.ddpm_step, plus ``eta`` in [0, 1]."""
    B = x.shape[0]
    N = x[0].numel()
    x_prev = torch.empty_like(x) if x_prev is None else x_prev
    if store_x0 and x0 is None:
        x0 = torch.empty_like(x)
    check_inputs(x, model_output, i, seed_words, table, x_prev, x0 if store_x0 else None)
    block = block or block_for(N)
    col = {name: k for k, name in enumerate(COLUMNS)}
    grid = (B, triton.cdiv(N, block))
    _ddim_step_kernel[grid](
        x, model_output, x_prev, x0 if store_x0 else x_prev, i, seed_words, table, N, float(eta),  # dummy x0
        NCOLS=len(COLUMNS), C_SA=col["sqrt_alphas_cumprod"], C_S1MA=col["sqrt_one_minus_alphas_cumprod"],
        C_SRECIP=col["sqrt_recip_alphas_cumprod"], C_SRECIPM1=col["sqrt_recipm1_alphas_cumprod"],
        C_ABAR=col["alphas_cumprod"], C_ABAR_PREV=col["ddim_alphas_cumprod_prev"],
        PRED=prediction, CLIP=bool(clip_denoised), STORE_X0=bool(store_x0), HAS_NOISE=float(eta) > 0.0,
        KEY64=PHILOX_KEY, ROUNDS=PHILOX_ROUNDS, BLOCK=block,
    )
    return x_prev, (x0 if store_x0 else None)
