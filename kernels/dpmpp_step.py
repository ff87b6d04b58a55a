"""Fused DPM-Solver++(2M) step (Lu et al. 2022): one kernel per step, no noise (an ODE solver).

Reference: ``engine.samplers.dpmpp_2m_step`` (imported here as ``reference``; the tests hold the
kernel to it); the coefficients and their derivation are in ``engine.schedules.Tables``. Per
element of sample b at step index i:

    x0      = from the model output (eps / x0 / v), clamp(x0, -1, 1) optional   read x, out
    x_prev  = coef_x[i] * x + coef_x0[i] * x0 + coef_x0_prev[i] * x0_prev         read x0_prev
    x0_prev <- x0                                                                 write x_prev, x0

First-order steps (the first and the last) have coef_x0_prev = 0, and there x0_prev is not even
read (masked load), so a zeros or stale buffer cannot leak in. The multistep state is x0_prev
alone (``Rows.x0_prev``), updated in place: a batch may mix samples at any steps.

Memory traffic per element, s = itemsize of the I/O dtype: read x_t, the model output and
x0_prev (3 s; x0_prev is skipped on first-order steps), write x_prev and x0 (2 s): 5 s bytes
(20 in fp32). Per sample: i (8 bytes) and 7 table entries (28). The torch reference makes about
8 passes (x0, its products, the where, the sums, the copies into the state).
"""

import itertools

import torch
import triton
import triton.language as tl

from ddpm_engine.errors import InvalidRequestError

from ddpm_engine.samplers import dpmpp_2m_step as reference  # noqa: F401  (the specification)

from .options import FP_FUSION
from .common import (COL_DPMPP_X, COL_DPMPP_X0, COL_DPMPP_X0_PREV, PRED_EPSILON, PREDICTION_CODE, block_for,
                     check_inputs, clip_x0, grid_for, predict_x0_and_eps, step_prologue)


@triton.jit
def _dpmpp_2m_step_kernel(
    x_ptr,        # [B, N] x_t (fp32 / fp16 / bf16)
    out_ptr,      # [B, N] model output
    x0prev_ptr,   # [B, N] in: the previous step's x0; out: this step's x0 (float32 state)
    xprev_ptr,    # [B, N] out: x_{t-1}, x's dtype
    i_ptr,        # int64 [B]: step indices (read only)
    table_ptr,    # fp32 [steps, NCOLS]: packed coefficient table
    N,
    PRED: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr,
):
    b, i, row, offs, mask, flat = step_prologue(i_ptr, table_ptr, N, BLOCK)
    coef_x = tl.load(row + COL_DPMPP_X)
    coef_x0 = tl.load(row + COL_DPMPP_X0)
    coef_x0_prev = tl.load(row + COL_DPMPP_X0_PREV)

    x = tl.load(x_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    n_prev = tl.where(coef_x0_prev != 0.0, N, 0)  # first-order step: read none of x0_prev
    x0_prev = tl.load(x0prev_ptr + flat, mask=offs < n_prev, other=0.0).to(tl.float32)
    x0, _ = predict_x0_and_eps(x, out, row, PRED)
    if CLIP:
        x0 = clip_x0(x0)
    x_prev = coef_x * x + coef_x0 * x0 + coef_x0_prev * x0_prev
    tl.store(xprev_ptr + flat, x_prev.to(xprev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0prev_ptr + flat, x0.to(x0prev_ptr.dtype.element_ty), mask=mask)


def dpmpp_2m_step(x, model_output, i, x0_prev, table, *, prediction=PRED_EPSILON, clip_denoised: bool = False,
                  x_prev=None, block: int | None = None):
    """Launch the fused DPM-Solver++(2M) step. ``x0_prev`` (same shape as x, contiguous; zeros at the
    start of a run) is read and overwritten in place with this step's x0, which is also returned.
    ``table`` is DeviceTables.packed (fp32), ``prediction`` a code of common.PREDICTION_CODE; ``i`` is
    not advanced here (see common.advance). Returns (x_prev, x0); ``x_prev=x`` steps in place."""
    if x0_prev is None:
        raise InvalidRequestError("the DPM-Solver++(2M) step keeps each sample's previous x0 in x0_prev "
                                  "(stepping.Rows.x0_prev): allocate it (zeros, shaped as x) before the first step")
    x_prev = torch.empty_like(x) if x_prev is None else x_prev
    check_inputs(x, i, table, model_output=model_output, x_prev=x_prev, x0_prev=x0_prev)
    block = block or block_for(x[0].numel())
    _dpmpp_2m_step_kernel[grid_for(x, block)](
        x, model_output, x0_prev, x_prev, i, table, x[0].numel(),
        PRED=prediction, CLIP=bool(clip_denoised), BLOCK=block, enable_fp_fusion=FP_FUSION,
    )
    return x_prev, x0_prev


def launches(t):
    """Every compile-time choice ``dpmpp_2m_step`` can pass its kernel, as launches on the stand-in
    tensors ``t``: see ddpm_step.launches."""
    for pred, clip in itertools.product(PREDICTION_CODE.values(), (False, True)):
        yield lambda p=pred, c=clip: dpmpp_2m_step(t.x, t.model_output, t.i, t.x0_prev, t.table, prediction=p,
                                                   clip_denoised=c)
