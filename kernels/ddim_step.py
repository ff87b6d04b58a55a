"""Fused DDIM step (Song et al. 2021, eq. 12), any eta, noise generated inside.

Reference: ``engine.samplers.ddim_step`` (imported here as ``reference``; the tests hold the
kernel to it). Per element of sample b at step index i:

    x0, eps = from the model output;  if clipping: x0 = clamp(x0, -1, 1), and only with
              use_clipped_model_output eps = (x - sqrt(abar) x0) / sqrt(1 - abar) (diffusers' option)
    sigma   = eta * sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))        (eq. 16)
    x_prev  = sqrt(abar_prev) x0 + sqrt(max(1 - abar_prev - sigma^2, 0)) eps + sigma z
              (1 - abar_prev - sigma^2 as (1 - abar_prev) (1 - eta^2 (1 - abar / abar_prev) / (1 - abar)):
              exactly 0 at abar = 0 with eta = 1, as the reference)

Memory traffic per element, s = itemsize of the I/O dtype: read x_t and the model output (2 s),
write x_prev (s), plus s for x0 only when STORE_X0: 3 s bytes (12 in fp32). Per sample: i (8
bytes), seed words (16), 6 table entries (24). With eta == 0 (HAS_NOISE false) no noise is drawn.
"""

import itertools

import torch
import triton
import triton.language as tl

from ddpm_engine.samplers import ddim_step as reference  # noqa: F401  (the specification)

from .options import FP_FUSION
from .common import (COL_ABAR, COL_DDIM_ABAR_PREV, COL_SQRT_1M_ABAR, COL_SQRT_ABAR, PREDICTION_CODE, PRED_EPSILON,
                     STAND_IN_SCALE, block_for, check_inputs, clip_x0, grid_for, guided_stand_in, load_output,
                     output_parts, predict_x0_and_eps, step_noise, step_prologue)


@triton.jit
def _ddim_step_kernel(
    x_ptr,        # [B, N] x_t
    out_ptr,      # [B, >= N] model output's prediction part, per-sample stride out_stride
    xprev_ptr,    # [B, N] out: x_{t-1}
    x0_ptr,       # [B, N] out: predicted x0 (only when STORE_X0)
    i_ptr,        # int64 [B]: step indices (read only)
    seed_ptr,     # int64 [B, 2]: seed words
    table_ptr,    # fp32 [steps, NCOLS]: packed coefficient table
    N,            # elements per sample
    out_stride,   # elements from one sample's model output to the next (N, or 2N: common.output_parts)
    guidance_scale,  # classifier-free guidance's scale (read only when GUIDED: common.load_output)
    eta,
    PRED: tl.constexpr, GUIDED: tl.constexpr, CLIP: tl.constexpr, USE_CLIPPED_MODEL_OUTPUT: tl.constexpr,
    STORE_X0: tl.constexpr,
    HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr,
):
    b, i, row, offs, mask, flat = step_prologue(i_ptr, table_ptr, N, BLOCK)
    abar = tl.load(row + COL_ABAR)
    abar_prev = tl.load(row + COL_DDIM_ABAR_PREV)

    x = tl.load(x_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    out = load_output(out_ptr, b, offs, mask, out_stride, guidance_scale, GUIDED)
    x0, eps = predict_x0_and_eps(x, out, row, PRED)
    if CLIP:
        x0 = clip_x0(x0)
        if USE_CLIPPED_MODEL_OUTPUT:
            eps = (x - tl.load(row + COL_SQRT_ABAR) * x0) / tl.load(row + COL_SQRT_1M_ABAR)
    x_prev = tl.sqrt_rn(abar_prev) * x0
    if HAS_NOISE:
        sigma = eta * tl.sqrt_rn((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
        direction = (1.0 - abar_prev) * (1.0 - eta * eta * (1.0 - abar / abar_prev) / (1.0 - abar))
        x_prev += tl.sqrt_rn(tl.maximum(direction, 0.0)) * eps
        x_prev += sigma * step_noise(b, i, offs, seed_ptr)
    else:
        x_prev += tl.sqrt_rn(tl.maximum(1.0 - abar_prev, 0.0)) * eps
    tl.store(xprev_ptr + flat, x_prev.to(xprev_ptr.dtype.element_ty), mask=mask)
    if STORE_X0:
        tl.store(x0_ptr + flat, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def ddim_step(x, model_output, i, seed_words, table, *, eta: float = 0.0, prediction=PRED_EPSILON,
              clip_denoised: bool = False, use_clipped_model_output: bool = False, x_prev=None, x0=None,
              store_x0: bool = True, block: int | None = None, guidance_scale: float = 1.0):
    """Launch the fused DDIM step (``i`` is not advanced here; see common.advance). Arguments and
    return value as ddpm_step.ddpm_step, plus ``eta`` in [0, 1] and ``use_clipped_model_output``
    (diffusers' DDIMScheduler.step option; only matters with ``clip_denoised``)."""
    x_prev = torch.empty_like(x) if x_prev is None else x_prev
    if store_x0 and x0 is None:
        x0 = torch.empty_like(x)
    check_inputs(x, i, table, seed_words, x_prev=x_prev, x0=x0 if store_x0 else None)
    prediction_part, _, out_stride, guidance_scale, guided = output_parts(model_output, x, None, guidance_scale)
    block = block or block_for(x[0].numel())
    _ddim_step_kernel[grid_for(x, block)](
        x, prediction_part, x_prev, x0 if store_x0 else x_prev, i, seed_words, table, x[0].numel(), out_stride,
        guidance_scale, float(eta),
        PRED=prediction, GUIDED=guided, CLIP=bool(clip_denoised),
        USE_CLIPPED_MODEL_OUTPUT=bool(use_clipped_model_output), STORE_X0=bool(store_x0), HAS_NOISE=float(eta) > 0.0,
        BLOCK=block, enable_fp_fusion=FP_FUSION,
    )
    return x_prev, (x0 if store_x0 else None)


def step_rows(spec, prediction, table, rows, model_output, x0=None, guidance_scale=1.0):
    """The engine's "ddim" step (samplers.SamplerDef.kernel; kernels.triton_step documents the
    signature): rows.x stepped in place, x0 written into ``x0`` when given."""
    return ddim_step(rows.x, model_output, rows.i, rows.words, table, eta=spec.eta, prediction=prediction,
                     clip_denoised=spec.clip_denoised, use_clipped_model_output=spec.use_clipped_model_output,
                     x_prev=rows.x, x0=x0, store_x0=x0 is not None, guidance_scale=guidance_scale)[1]


def launches(t):
    """Every compile-time choice ``ddim_step`` can pass its kernel (eta 0 or not: HAS_NOISE), as
    launches on the stand-in tensors ``t``: see ddpm_step.launches."""
    for pred, clip, clipped_out, store, eta, guided in itertools.product(
            PREDICTION_CODE.values(), (False, True), (False, True), (False, True), (0.0, 0.5), (False, True)):
        yield lambda p=pred, c=clip, u=clipped_out, s=store, e=eta, g=guided: ddim_step(
            t.x, guided_stand_in(t.model_output, g), t.i, t.seed_words, t.table, eta=e, prediction=p, clip_denoised=c,
            use_clipped_model_output=u, store_x0=s, guidance_scale=STAND_IN_SCALE if g else 1.0)
