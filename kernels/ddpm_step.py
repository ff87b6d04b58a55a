"""Fused DDPM ancestral step: one kernel per reverse step, noise generated inside: the posterior
update (mean, log-variance, noise mask) in one pass.

Reference: ``engine.samplers.ddpm_step`` (imported here as ``reference``; the tests hold the
kernel to it). Per element of sample b at step index i:

    x0     = sqrt_recip[i] * x - sqrt_recipm1[i] * eps      (or x0 = out, or from v)   read x, out
    x0     = clamp(x0, -1, 1)                                 (optional)
    mean   = coef1[i] * x0 + coef2[i] * x                     (DDPM eq. 7)
    std    = exp(0.5 * logvar[i])                             fixed_small / fixed_large: a table column
           = exp(0.5 * (f max_log[i] + (1 - f) min_log[i]))   learned_range, f = (v + 1) / 2   read v
           = sqrt(v)                                          learned (diffusers: v is sigma^2)   read v
    x_prev = mean + where(i != 0, std * z, 0)                z: Philox(e, i, seed_b)  write x_prev

With a learned variance the model output is [B, 2C, ...], [prediction, variance part v]; both
parts are read in place through one per-sample stride (common.output_parts), no copy.

Memory traffic per element, s = itemsize of the I/O dtype (4 fp32, 2 fp16/bf16):
read x_t and the model output's prediction (2 s) and, with a learned variance, its variance part
v (s), write x_prev (s), plus s for x0 only when STORE_X0: 3 s bytes (12 in fp32), 4 s (16) with
a learned variance. Per sample, once per program: i (8 bytes), the seed words (16), up to 8
table entries (32),
all cache hits after the first program of a sample. The torch reference reads x, out and a
materialised noise tensor and writes noise, x0, several temporaries and x_prev: about 10 passes.
"""

import itertools

import torch
import triton
import triton.language as tl

from ddpm_engine.samplers import ddpm_step as reference  # noqa: F401  (the specification)
from ddpm_engine.schedules import Variance

from .options import FP_FUSION
from .common import (COL_LARGE_LOG_VARIANCE, COL_POSTERIOR_COEF1, COL_POSTERIOR_COEF2, COL_SMALL_LOG_VARIANCE,
                     PREDICTION_CODE, PRED_EPSILON, STAND_IN_SCALE, VARIANCE_CODE, VAR_FIXED_LARGE, VAR_FIXED_SMALL,
                     VAR_LEARNED, block_for, check_inputs, clip_x0, grid_for, guided_stand_in, load_output,
                     output_parts, predict_x0_and_eps, step_noise, step_prologue)


@triton.jit
def _ddpm_step_kernel(
    x_ptr,        # [B, N] x_t (fp32 / fp16 / bf16)
    out_ptr,      # [B, >= N] the model output's prediction part, per-sample stride out_stride
    var_ptr,      # [B, >= N] its variance part, same stride (read only with a learned VARIANCE)
    xprev_ptr,    # [B, N] out: x_{t-1}, x's dtype
    x0_ptr,       # [B, N] out: predicted x0 (only written when STORE_X0)
    i_ptr,        # int64 [B]: each sample's step index (read only here)
    seed_ptr,     # int64 [B, 2]: each sample's seed words (lo, hi)
    table_ptr,    # fp32 [steps, NCOLS]: packed coefficient table
    N,            # elements per sample
    out_stride,   # elements from one sample's model output to the next (N, or 2N with a learned variance)
    guidance_scale,  # classifier-free guidance's scale (read only when GUIDED: common.load_output)
    PRED: tl.constexpr, GUIDED: tl.constexpr, CLIP: tl.constexpr, VARIANCE: tl.constexpr, STORE_X0: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b, i, row, offs, mask, flat = step_prologue(i_ptr, table_ptr, N, BLOCK)
    x = tl.load(x_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    out = load_output(out_ptr, b, offs, mask, out_stride, guidance_scale, GUIDED)
    if VARIANCE == VAR_FIXED_SMALL:
        std = tl.exp(0.5 * tl.load(row + COL_SMALL_LOG_VARIANCE))
    elif VARIANCE == VAR_FIXED_LARGE:
        std = tl.exp(0.5 * tl.load(row + COL_LARGE_LOG_VARIANCE))
    elif VARIANCE == VAR_LEARNED:
        std = tl.sqrt_rn(load_output(var_ptr, b, offs, mask, out_stride, guidance_scale, False))
    else:  # learned_range: from min_log (the clipped posterior log-variance) to max_log (log beta)
        frac = (load_output(var_ptr, b, offs, mask, out_stride, guidance_scale, False) + 1.0) / 2.0
        min_log, max_log = tl.load(row + COL_SMALL_LOG_VARIANCE), tl.load(row + COL_LARGE_LOG_VARIANCE)
        std = tl.exp(0.5 * (frac * max_log + (1.0 - frac) * min_log))

    x0, _ = predict_x0_and_eps(x, out, row, PRED)
    if CLIP:
        x0 = clip_x0(x0)
    mean = tl.load(row + COL_POSTERIOR_COEF1) * x0 + tl.load(row + COL_POSTERIOR_COEF2) * x
    x_prev = mean + tl.where(i != 0, std * step_noise(b, i, offs, seed_ptr), 0.0)  # no noise at i == 0
    tl.store(xprev_ptr + flat, x_prev.to(xprev_ptr.dtype.element_ty), mask=mask)
    if STORE_X0:
        tl.store(x0_ptr + flat, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def ddpm_step(x, model_output, i, seed_words, table, *, prediction=PRED_EPSILON, variance="fixed_small",
              clip_denoised: bool = False, x_prev=None, x0=None, store_x0: bool = True, block: int | None = None,
              guidance_scale: float = 1.0):
    """Launch the fused DDPM step. ``table`` is DeviceTables.packed (fp32); ``prediction`` a code of
    common.PREDICTION_CODE; ``variance`` a Variance or its name: with a learned one ``model_output``
    is the model's 2C-channel output (engine.samplers.model_output_parts), read in place; ``i``
    int64 [B] is NOT advanced here (call ``common.advance(i)``). Returns (x_prev, x0 or None); pass
    ``x_prev`` / ``x0`` to write into preallocated buffers (CUDA-graph friendly); ``x_prev=x``
    steps in place (each element is read and then written by the same program, so that is safe).
    ``guidance_scale`` other than 1: ``model_output`` is a guided call's [2B, ...] (the conditional
    rows, then the unconditional ones: engine.guidance.guided), combined as the kernel reads it
    (common.load_output); every launcher of the package takes it the same way."""
    variance = Variance.parse(variance)
    x_prev = torch.empty_like(x) if x_prev is None else x_prev
    if store_x0 and x0 is None:
        x0 = torch.empty_like(x)
    check_inputs(x, i, table, seed_words, x_prev=x_prev, x0=x0 if store_x0 else None)
    prediction_part, variance_part, out_stride, guidance_scale, guided = output_parts(model_output, x, variance,
                                                                                     guidance_scale)
    block = block or block_for(x[0].numel())
    _ddpm_step_kernel[grid_for(x, block)](
        x, prediction_part, variance_part, x_prev, x0 if store_x0 else x_prev, i, seed_words, table,  # x_prev: dummy x0
        x[0].numel(), out_stride, guidance_scale, PRED=prediction, GUIDED=guided, CLIP=bool(clip_denoised),
        VARIANCE=VARIANCE_CODE[variance], STORE_X0=bool(store_x0), BLOCK=block, enable_fp_fusion=FP_FUSION,
    )
    return x_prev, (x0 if store_x0 else None)


def step_rows(spec, prediction, table, rows, model_output, x0=None, guidance_scale=1.0):
    """The engine's "ddpm" step (samplers.SamplerDef.kernel; kernels.triton_step documents the
    signature): rows.x stepped in place, x0 written into ``x0`` when given."""
    return ddpm_step(rows.x, model_output, rows.i, rows.words, table, prediction=prediction, variance=spec.variance,
                     clip_denoised=spec.clip_denoised, x_prev=rows.x, x0=x0, store_x0=x0 is not None,
                     guidance_scale=guidance_scale)[1]


def launches(t):
    """Every compile-time choice ``ddpm_step`` can pass its kernel, as launches on the stand-in tensors
    ``t`` (x, model_output, i, seed_words, table, x0_prev of one I/O dtype and sample size). The
    sm_90 compile test (tests/kernels/test_compile_sm90.py) runs each with every I/O dtype; a
    module with a kernel declares its own ``launches`` beside its launcher."""
    for pred, variance, clip, store, guided in itertools.product(PREDICTION_CODE.values(), Variance, (False, True),
                                                                 (False, True), (False, True)):
        yield lambda p=pred, v=variance, c=clip, s=store, g=guided: ddpm_step(
            t.x, guided_stand_in(torch.cat([t.model_output, t.model_output], 1) if v.learned else t.model_output, g),
            t.i, t.seed_words, t.table, prediction=p, variance=v, clip_denoised=c, store_x0=s,
            guidance_scale=STAND_IN_SCALE if g else 1.0)
