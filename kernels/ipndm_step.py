"""Fused iPNDM step (Zhang & Chen 2023, improved PNDM, orders 1 to 4): one kernel per step.

Reference: ``engine.samplers.ipndm_step`` (imported here as ``reference``; the tests hold the
kernel to it); the coefficients and their derivation are in ``engine.schedules.Tables``. Per
element of sample b at step index i:

    x0, eps   = from the model output; with clipping x0 = clamp(x0, -1, 1),
                eps = (x - sqrt(abar) x0) / sqrt(1 - abar)                          read x, out
    x_prev    = ipndm_coef_x[i] x + ipndm_coef_eps[i] eps + ipndm_coef_eps_prev[i] eps_prev
                + ipndm_coef_eps_prev2[i] eps_prev2 + ipndm_coef_eps_prev3[i] eps_prev3  read 3 states
    eps_prev3 <- eps_prev2,  eps_prev2 <- eps_prev,  eps_prev <- eps            write x_prev, 3 states

A state's term is 0 where its coefficient is 0 (a where: NaN in a fresh or stale buffer cannot
leak in), and eps_prev3 is not even read there (masked load); eps_prev and eps_prev2 are always
read, because they move on. The state (``Rows.eps_prev``, ``eps_prev2``, ``eps_prev3``) is
updated in place: a batch may mix samples at any steps.

Launch choices (compile-time constants): PRED in PREDICTION_CODE (3), CLIP (2), BLOCK from
common.block_for (powers of two 16..1024); fp32 / fp16 / bf16 x and model output, fp32 state.

Memory traffic per element, s = itemsize of the I/O dtype: read x_t and the model output (2 s)
and the three fp32 states (12 bytes; eps_prev3 skipped below order 4), write x_prev (s) and the
three states (12): 3 s + 24 bytes (36 in fp32). Per sample: i (8 bytes) and up to 11 table
entries. The torch reference makes about 20 passes.
"""

import itertools

import torch
import triton
import triton.language as tl

from ddpm_engine.errors import InvalidRequestError
from ddpm_engine.schedules import COLUMNS

from ddpm_engine.samplers import ipndm_step as reference  # noqa: F401  (the specification)

from .options import FP_FUSION
from .common import (COL_SQRT_1M_ABAR, COL_SQRT_ABAR, PREDICTION_CODE, PRED_EPSILON, STAND_IN_SCALE, block_for,
                     check_inputs, clip_x0, grid_for, guided_stand_in, load_output, load_state, output_parts,
                     predict_x0_and_eps, step_prologue)

COL_IPNDM_X = tl.constexpr(COLUMNS.index("ipndm_coef_x"))
COL_IPNDM_EPS = tl.constexpr(COLUMNS.index("ipndm_coef_eps"))
COL_IPNDM_EPS_PREV = tl.constexpr(COLUMNS.index("ipndm_coef_eps_prev"))
COL_IPNDM_EPS_PREV2 = tl.constexpr(COLUMNS.index("ipndm_coef_eps_prev2"))
COL_IPNDM_EPS_PREV3 = tl.constexpr(COLUMNS.index("ipndm_coef_eps_prev3"))


@triton.jit
def _ipndm_step_kernel(
    x_ptr,          # [B, N] x_t (fp32 / fp16 / bf16)
    out_ptr,        # [B, >= N] model output's prediction part, per-sample stride out_stride
    eps1_ptr,       # [B, N] in: the previous step's eps; out: this step's (float32 state)
    eps2_ptr,       # [B, N] in: the eps of two steps ago; out: the previous step's (float32 state)
    eps3_ptr,       # [B, N] in: the eps of three steps ago; out: of two steps ago (float32 state)
    xprev_ptr,      # [B, N] out: x_{t-1}, x's dtype
    x0_ptr,         # [B, N] out: predicted x0 (only when STORE_X0)
    i_ptr,          # int64 [B]: step indices (read only)
    table_ptr,      # fp32 [steps, NCOLS]: packed coefficient table
    N,             # elements per sample
    out_stride,    # elements from one sample's model output to the next (N, or 2N: common.output_parts)
    guidance_scale,  # classifier-free guidance's scale (read only when GUIDED: common.load_output)
    PRED: tl.constexpr, GUIDED: tl.constexpr, CLIP: tl.constexpr, STORE_X0: tl.constexpr, BLOCK: tl.constexpr,
):
    b, i, row, offs, mask, flat = step_prologue(i_ptr, table_ptr, N, BLOCK)
    c1 = tl.load(row + COL_IPNDM_EPS_PREV)
    c2 = tl.load(row + COL_IPNDM_EPS_PREV2)
    c3 = tl.load(row + COL_IPNDM_EPS_PREV3)
    x = tl.load(x_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    out = load_output(out_ptr, b, offs, mask, out_stride, guidance_scale, GUIDED)
    eps1 = tl.load(eps1_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    eps2 = tl.load(eps2_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    eps3 = load_state(eps3_ptr, flat, offs, N, c3)
    x0, eps = predict_x0_and_eps(x, out, row, PRED)
    if CLIP:
        x0 = clip_x0(x0)
        eps = (x - tl.load(row + COL_SQRT_ABAR) * x0) / tl.load(row + COL_SQRT_1M_ABAR)
    x_prev = (tl.load(row + COL_IPNDM_X) * x + tl.load(row + COL_IPNDM_EPS) * eps
              + tl.where(c1 != 0.0, c1 * eps1, 0.0) + tl.where(c2 != 0.0, c2 * eps2, 0.0) + c3 * eps3)
    tl.store(xprev_ptr + flat, x_prev.to(xprev_ptr.dtype.element_ty), mask=mask)
    tl.store(eps3_ptr + flat, eps2.to(eps3_ptr.dtype.element_ty), mask=mask)
    tl.store(eps2_ptr + flat, eps1.to(eps2_ptr.dtype.element_ty), mask=mask)
    tl.store(eps1_ptr + flat, eps.to(eps1_ptr.dtype.element_ty), mask=mask)
    if STORE_X0:
        tl.store(x0_ptr + flat, x0.to(x0_ptr.dtype.element_ty), mask=mask)


def ipndm_step(x, model_output, i, eps_prev, eps_prev2, eps_prev3, table, *, prediction=PRED_EPSILON,
               clip_denoised: bool = False, x_prev=None, x0=None, block: int | None = None,
               guidance_scale: float = 1.0):
    """Launch the fused iPNDM step. ``eps_prev``, ``eps_prev2``, ``eps_prev3`` (shaped as x, contiguous;
    zeros at the start of a run) are read and shifted in place (eps_prev3 <- eps_prev2 <- eps_prev
    <- this step's eps). ``x0``: a buffer for the predicted x0, written when given. ``table`` is
    DeviceTables.packed (fp32), ``prediction`` a code of common.PREDICTION_CODE; ``i`` is not
    advanced here (see common.advance). Returns (x_prev, x0); ``x_prev=x`` steps in place."""
    if eps_prev is None or eps_prev2 is None or eps_prev3 is None:
        raise InvalidRequestError("the iPNDM step keeps each sample's three previous eps in eps_prev, eps_prev2 "
                                  "and eps_prev3 (stepping.Rows): allocate them (zeros, shaped as x) before the "
                                  "first step")
    x_prev = torch.empty_like(x) if x_prev is None else x_prev
    check_inputs(x, i, table, x_prev=x_prev, x0=x0, eps_prev=eps_prev,
                 eps_prev2=eps_prev2, eps_prev3=eps_prev3)
    prediction_part, _, out_stride, guidance_scale, guided = output_parts(model_output, x, None, guidance_scale)
    block = block or block_for(x[0].numel())
    _ipndm_step_kernel[grid_for(x, block)](
        x, prediction_part, eps_prev, eps_prev2, eps_prev3, x_prev, x_prev if x0 is None else x0, i, table,
        x[0].numel(), out_stride, guidance_scale, PRED=prediction, GUIDED=guided, CLIP=bool(clip_denoised),
        STORE_X0=x0 is not None, BLOCK=block,
        enable_fp_fusion=FP_FUSION,
    )
    return x_prev, x0


def step_rows(spec, prediction, table, rows, model_output, x0=None, guidance_scale=1.0):
    """The engine's "ipndm" step (samplers.SamplerDef.kernel; kernels.triton_step documents the
    signature): rows.x and its three eps states stepped in place; the predicted x0 written into
    ``x0`` when given (returned), else None."""
    return ipndm_step(rows.x, model_output, rows.i, rows.eps_prev, rows.eps_prev2, rows.eps_prev3, table,
                      prediction=prediction, clip_denoised=spec.clip_denoised, x_prev=rows.x, x0=x0,
                      guidance_scale=guidance_scale)[1]


def launches(t):
    """Every compile-time choice ``ipndm_step`` can pass its kernel, as launches on stand-in tensors
    ``t`` (x, model_output, i, seed_words, table, x0_prev of one I/O dtype): for the sm_90 compile check."""
    for pred, clip, store, guided in itertools.product(PREDICTION_CODE.values(), (False, True), (False, True),
                                                       (False, True)):
        yield lambda p=pred, c=clip, s=store, g=guided: ipndm_step(
            t.x, guided_stand_in(t.model_output, g), t.i, t.x0_prev, torch.zeros_like(t.x0_prev),
            torch.zeros_like(t.x0_prev), t.table, prediction=p, clip_denoised=c,
            x0=torch.empty_like(t.x) if s else None, guidance_scale=STAND_IN_SCALE if g else 1.0)
