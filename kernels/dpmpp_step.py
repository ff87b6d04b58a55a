"""Fused DPM-Solver++(2M) steps (Lu et al. 2022), ODE and SDE: one kernel per step.

References: ``engine.samplers.dpmpp_2m_step`` and ``dpmpp_2m_sde_step`` (imported here as
``reference`` and ``reference_sde``; the tests hold the kernels to them); the coefficients and
their derivation are in ``engine.schedules.Tables``. Per element of sample b at step index i:

    x0      = from the model output (eps / x0 / v), clamp(x0, -1, 1) optional   read x, out
    x_prev  = coef_x[i] * x + coef_x0[i] * x0 + coef_x0_prev[i] * x0_prev         read x0_prev
            (+ sde_noise_std[i] * z,  z: Philox(e, SDE_STEP + i, seed_b), the SDE only)
    x0_prev <- x0                                                                 write x_prev, x0

The ODE reads the ``dpmpp_coef_*`` columns, the SDE the ``sde_coef_*`` ones. First-order steps
(the first and the last) have coef_x0_prev = 0, and there x0_prev is not even read (masked
load), so a zeros or stale buffer cannot leak in. The multistep state is x0_prev alone
(``Rows.x0_prev``), updated in place: a batch may mix samples at any steps.

Launch choices (compile-time constants): PRED in PREDICTION_CODE (3), CLIP (2), BLOCK from
common.block_for (powers of two 16..1024); fp32 / fp16 / bf16 x and model output, fp32 state.

Memory traffic per element, s = itemsize of the I/O dtype: read x_t, the model output and
x0_prev (3 s; x0_prev is skipped on first-order steps), write x_prev and x0 (2 s): 5 s bytes
(20 in fp32); the SDE's noise is made in registers. Per sample: i (8 bytes), 7-8 table entries
and, for the SDE, the seed words (16). The torch reference makes about 8 passes (x0, its
products, the where, the sums, the copies into the state; the SDE also writes and reads the noise).
"""

import itertools

import torch
import triton
import triton.language as tl

from ddpm_engine.errors import InvalidRequestError
from ddpm_engine.noise import SDE_STEP

from ddpm_engine.samplers import dpmpp_2m_step as reference  # noqa: F401  (the specification)
from ddpm_engine.samplers import dpmpp_2m_sde_step as reference_sde  # noqa: F401  (the specification)

from .options import FP_FUSION
from .common import (COL_DPMPP_X, COL_DPMPP_X0, COL_DPMPP_X0_PREV, COL_SDE_NOISE_STD, COL_SDE_X, COL_SDE_X0,
                     COL_SDE_X0_PREV, PREDICTION_CODE, PRED_EPSILON, STAND_IN_SCALE, block_for, check_inputs, clip_x0,
                     grid_for, guided_stand_in, load_output, load_state, output_parts, predict_x0_and_eps, step_noise,
                     step_prologue)

SDE_COUNTER = tl.constexpr(SDE_STEP)


@triton.jit
def dpmpp_2m_update(x_ptr, out_ptr, x0prev_ptr, i_ptr, table_ptr, N, out_stride, guidance_scale,
                    COL_X: tl.constexpr, COL_X0: tl.constexpr, COL_X0_PREV: tl.constexpr,
                    PRED: tl.constexpr, GUIDED: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr):
    """This program's part of the multistep update from the table columns COL_*: returns the
    prologue's (b, i, row, offs, mask, flat), x_prev without noise, and x0 (fp32)."""
    b, i, row, offs, mask, flat = step_prologue(i_ptr, table_ptr, N, BLOCK)
    coef_x0_prev = tl.load(row + COL_X0_PREV)
    x = tl.load(x_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    out = load_output(out_ptr, b, offs, mask, out_stride, guidance_scale, GUIDED)
    x0_prev = load_state(x0prev_ptr, flat, offs, N, coef_x0_prev)
    x0, _ = predict_x0_and_eps(x, out, row, PRED)
    if CLIP:
        x0 = clip_x0(x0)
    x_prev = tl.load(row + COL_X) * x + tl.load(row + COL_X0) * x0 + coef_x0_prev * x0_prev
    return b, i, row, offs, mask, flat, x_prev, x0


@triton.jit
def _dpmpp_2m_step_kernel(
    x_ptr,        # [B, N] x_t (fp32 / fp16 / bf16)
    out_ptr,      # [B, >= N] model output's prediction part, per-sample stride out_stride
    x0prev_ptr,   # [B, N] in: the previous step's x0; out: this step's x0 (float32 state)
    xprev_ptr,    # [B, N] out: x_{t-1}, x's dtype
    i_ptr,        # int64 [B]: step indices (read only)
    table_ptr,    # fp32 [steps, NCOLS]: packed coefficient table
    N,            # elements per sample
    out_stride,   # elements from one sample's model output to the next (N, or 2N: common.output_parts)
    guidance_scale,  # classifier-free guidance's scale (read only when GUIDED: common.load_output)
    PRED: tl.constexpr, GUIDED: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr,
):
    _, _, _, _, mask, flat, x_prev, x0 = dpmpp_2m_update(
        x_ptr, out_ptr, x0prev_ptr, i_ptr, table_ptr, N, out_stride, guidance_scale, COL_DPMPP_X, COL_DPMPP_X0,
        COL_DPMPP_X0_PREV, PRED, GUIDED, CLIP, BLOCK)
    tl.store(xprev_ptr + flat, x_prev.to(xprev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0prev_ptr + flat, x0.to(x0prev_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dpmpp_2m_sde_step_kernel(
    x_ptr,        # [B, N] x_t (fp32 / fp16 / bf16)
    out_ptr,      # [B, >= N] model output's prediction part, per-sample stride out_stride
    x0prev_ptr,   # [B, N] in: the previous step's x0; out: this step's x0 (float32 state)
    xprev_ptr,    # [B, N] out: x_{t-1}, x's dtype
    i_ptr,        # int64 [B]: step indices (read only)
    seed_ptr,     # int64 [B, 2]: each sample's seed words (lo, hi)
    table_ptr,    # fp32 [steps, NCOLS]: packed coefficient table
    N,            # elements per sample
    out_stride,   # elements from one sample's model output to the next (N, or 2N: common.output_parts)
    guidance_scale,  # classifier-free guidance's scale (read only when GUIDED: common.load_output)
    PRED: tl.constexpr, GUIDED: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr,
):
    b, i, row, offs, mask, flat, x_prev, x0 = dpmpp_2m_update(
        x_ptr, out_ptr, x0prev_ptr, i_ptr, table_ptr, N, out_stride, guidance_scale, COL_SDE_X, COL_SDE_X0,
        COL_SDE_X0_PREV, PRED, GUIDED, CLIP, BLOCK)
    x_prev += tl.load(row + COL_SDE_NOISE_STD) * step_noise(b, i + SDE_COUNTER, offs, seed_ptr)
    tl.store(xprev_ptr + flat, x_prev.to(xprev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0prev_ptr + flat, x0.to(x0prev_ptr.dtype.element_ty), mask=mask)


def dpmpp_2m_step(x, model_output, i, x0_prev, table, *, prediction=PRED_EPSILON, clip_denoised: bool = False,
                  x_prev=None, block: int | None = None, guidance_scale: float = 1.0, seed_words=None):
    """Launch the fused DPM-Solver++(2M) step; with ``seed_words`` (int64 [B, 2], engine.noise.seed_words)
    its SDE form (diffusers' "sde-dpmsolver++"), noise drawn in the kernel. ``x0_prev`` (same shape
    as x, contiguous; zeros at the start of a run) is read and overwritten in place with this step's
    x0, which is also returned. ``table`` is DeviceTables.packed (fp32), ``prediction`` a code of
    common.PREDICTION_CODE; ``i`` is not advanced here (see common.advance). Returns (x_prev, x0);
    ``x_prev=x`` steps in place."""
    if x0_prev is None:
        raise InvalidRequestError("the DPM-Solver++(2M) step keeps each sample's previous x0 in x0_prev "
                                  "(stepping.Rows.x0_prev): allocate it (zeros, shaped as x) before the first step")
    x_prev = torch.empty_like(x) if x_prev is None else x_prev
    check_inputs(x, i, table, seed_words, x_prev=x_prev, x0_prev=x0_prev)
    prediction_part, _, out_stride, guidance_scale, guided = output_parts(model_output, x, None, guidance_scale)
    block = block or block_for(x[0].numel())
    consts = dict(PRED=prediction, GUIDED=guided, CLIP=bool(clip_denoised), BLOCK=block, enable_fp_fusion=FP_FUSION)
    if seed_words is None:
        _dpmpp_2m_step_kernel[grid_for(x, block)](x, prediction_part, x0_prev, x_prev, i, table, x[0].numel(),
                                                  out_stride, guidance_scale, **consts)
    else:
        _dpmpp_2m_sde_step_kernel[grid_for(x, block)](x, prediction_part, x0_prev, x_prev, i, seed_words, table,
                                                      x[0].numel(), out_stride, guidance_scale, **consts)
    return x_prev, x0_prev


def step_rows(spec, prediction, table, rows, model_output, x0=None, guidance_scale=1.0):
    """The engine's "dpmpp_2m" step (samplers.SamplerDef.kernel; kernels.triton_step documents the
    signature): rows.x and rows.x0_prev stepped in place; returns rows.x0_prev when ``x0`` is given
    (the x0 is always written there), else None."""
    dpmpp_2m_step(rows.x, model_output, rows.i, rows.x0_prev, table, prediction=prediction,
                  clip_denoised=spec.clip_denoised, x_prev=rows.x, guidance_scale=guidance_scale)
    return None if x0 is None else rows.x0_prev


def step_rows_sde(spec, prediction, table, rows, model_output, x0=None, guidance_scale=1.0):
    """The engine's "dpmpp_2m_sde" step: as ``step_rows``, with the noise of the rows' seed words."""
    dpmpp_2m_step(rows.x, model_output, rows.i, rows.x0_prev, table, prediction=prediction,
                  clip_denoised=spec.clip_denoised, x_prev=rows.x, seed_words=rows.words, guidance_scale=guidance_scale)
    return None if x0 is None else rows.x0_prev


def launches(t):
    """Every compile-time choice ``dpmpp_2m_step`` can pass its two kernels (ODE: no seed words;
    SDE: seed words), as launches on stand-in tensors ``t`` (x, model_output, i, seed_words, table,
    x0_prev of one I/O dtype): for the sm_90 compile check."""
    for pred, clip, seeds, guided in itertools.product(PREDICTION_CODE.values(), (False, True), (None, "sde"),
                                                       (False, True)):
        yield lambda p=pred, c=clip, s=seeds, g=guided: dpmpp_2m_step(
            t.x, guided_stand_in(t.model_output, g), t.i, t.x0_prev, t.table, prediction=p, clip_denoised=c,
            seed_words=None if s is None else t.seed_words, guidance_scale=STAND_IN_SCALE if g else 1.0)
