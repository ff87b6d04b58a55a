"""Fused UniPC step at solver_order 3 (Zhao et al. 2023; bh2, predict_x0): corrector and predictor
in one kernel.

Reference: ``engine.samplers.unipc_3_step`` (imported here as ``reference``; the tests hold the
kernel to it); the coefficients and their derivation are in ``engine.schedules.Tables``. Per
element of sample b at step index i:

    x0        = from the model output at the predicted x (eps / x0 / v), clamp optional  read x, out
    x_c       = corrector + unipc3_corr_x0[i] x0   (UniC; x_c = x on the first step)     read corrector
    x_prev    = dpmpp_coef_x[i] x_c + unipc3_coef_x0[i] x0 + unipc3_coef_x0_prev[i] x0_prev
                + unipc3_coef_x0_prev2[i] x0_prev2                        (UniP)  read x0_prev, x0_prev2
    corrector <- unipc_next_x[i] x_c + unipc3_next_x0[i] x0 + unipc3_next_x0_prev[i] x0_prev
                 + unipc3_next_x0_prev2[i] x0_prev2
    x0_prev2  <- x0_prev,  x0_prev <- x0                    write x_prev, x0_prev, x0_prev2, corrector

A state's term is 0 where its coefficients are 0 (a where: NaN in a fresh or stale buffer cannot
leak in); the corrector and x0_prev2 are not even read there (masked loads). x0_prev is always
read, because it moves on to x0_prev2. The state (``Rows.x0_prev``, ``x0_prev2``, ``corrector``)
is updated in place; a batch may mix samples at any steps.

Launch choices (compile-time constants): PRED in PREDICTION_CODE (3), CLIP (2), BLOCK from
common.block_for (powers of two 16..1024); fp32 / fp16 / bf16 x and model output, fp32 state.

Memory traffic per element, s = itemsize of the I/O dtype: read x_t and the model output (2 s),
the three fp32 states (12 bytes; the corrector and x0_prev2 skipped where unused), write x_prev
(s) and the three states (12): 3 s + 24 bytes (36 in fp32). Per sample: i (8 bytes) and 13
table entries. The torch reference makes about 22 passes.
"""

import itertools

import torch
import triton
import triton.language as tl

from ddpm_engine.errors import InvalidRequestError
from ddpm_engine.schedules import COLUMNS

from ddpm_engine.samplers import unipc_3_step as reference  # noqa: F401  (the specification)

from .options import FP_FUSION
from .common import (COL_DPMPP_X, COL_UNIPC_NEXT_X, PREDICTION_CODE, PRED_EPSILON, STAND_IN_SCALE, block_for,
                     check_inputs, clip_x0, grid_for, guided_stand_in, load_output, load_state, output_parts,
                     predict_x0_and_eps, step_prologue)

COL_UNIPC3_X0 = tl.constexpr(COLUMNS.index("unipc3_coef_x0"))
COL_UNIPC3_X0_PREV = tl.constexpr(COLUMNS.index("unipc3_coef_x0_prev"))
COL_UNIPC3_X0_PREV2 = tl.constexpr(COLUMNS.index("unipc3_coef_x0_prev2"))
COL_UNIPC3_CORR_X0 = tl.constexpr(COLUMNS.index("unipc3_corr_x0"))
COL_UNIPC3_NEXT_X0 = tl.constexpr(COLUMNS.index("unipc3_next_x0"))
COL_UNIPC3_NEXT_X0_PREV = tl.constexpr(COLUMNS.index("unipc3_next_x0_prev"))
COL_UNIPC3_NEXT_X0_PREV2 = tl.constexpr(COLUMNS.index("unipc3_next_x0_prev2"))


@triton.jit
def _unipc_3_step_kernel(
    x_ptr,         # [B, N] x_t as predicted by the previous step (fp32 / fp16 / bf16)
    out_ptr,       # [B, >= N] model output's prediction part at x_t, per-sample stride out_stride
    x0prev_ptr,    # [B, N] in: the previous step's x0; out: this step's x0 (float32 state)
    x0prev2_ptr,   # [B, N] in: the x0 of two steps ago; out: the previous step's (float32 state)
    corr_ptr,      # [B, N] in: this step's corrector, known part; out: the next step's (float32 state)
    xprev_ptr,     # [B, N] out: x_{t-1}, x's dtype
    i_ptr,         # int64 [B]: step indices (read only)
    table_ptr,     # fp32 [steps, NCOLS]: packed coefficient table
    N,             # elements per sample
    out_stride,    # elements from one sample's model output to the next (N, or 2N: common.output_parts)
    guidance_scale,  # classifier-free guidance's scale (read only when GUIDED: common.load_output)
    PRED: tl.constexpr, GUIDED: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr,
):
    b, i, row, offs, mask, flat = step_prologue(i_ptr, table_ptr, N, BLOCK)
    corr_x0 = tl.load(row + COL_UNIPC3_CORR_X0)
    c_prev = tl.load(row + COL_UNIPC3_X0_PREV)
    c_prev2 = tl.load(row + COL_UNIPC3_X0_PREV2)
    n_prev = tl.load(row + COL_UNIPC3_NEXT_X0_PREV)
    n_prev2 = tl.load(row + COL_UNIPC3_NEXT_X0_PREV2)

    x = tl.load(x_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    out = load_output(out_ptr, b, offs, mask, out_stride, guidance_scale, GUIDED)
    corrector = load_state(corr_ptr, flat, offs, N, corr_x0)
    x0_prev = tl.load(x0prev_ptr + flat, mask=mask, other=0.0).to(tl.float32)
    x0_prev2 = load_state(x0prev2_ptr, flat, offs, N, tl.abs(c_prev2) + tl.abs(n_prev2))
    x0, _ = predict_x0_and_eps(x, out, row, PRED)
    if CLIP:
        x0 = clip_x0(x0)
    x_c = tl.where(corr_x0 != 0.0, corrector + corr_x0 * x0, x)
    x_prev = (tl.load(row + COL_DPMPP_X) * x_c + tl.load(row + COL_UNIPC3_X0) * x0
              + tl.where(c_prev != 0.0, c_prev * x0_prev, 0.0) + c_prev2 * x0_prev2)
    corrector = (tl.load(row + COL_UNIPC_NEXT_X) * x_c + tl.load(row + COL_UNIPC3_NEXT_X0) * x0
                 + tl.where(n_prev != 0.0, n_prev * x0_prev, 0.0) + n_prev2 * x0_prev2)
    tl.store(xprev_ptr + flat, x_prev.to(xprev_ptr.dtype.element_ty), mask=mask)
    tl.store(x0prev2_ptr + flat, x0_prev.to(x0prev2_ptr.dtype.element_ty), mask=mask)
    tl.store(x0prev_ptr + flat, x0.to(x0prev_ptr.dtype.element_ty), mask=mask)
    tl.store(corr_ptr + flat, corrector.to(corr_ptr.dtype.element_ty), mask=mask)


def unipc_3_step(x, model_output, i, x0_prev, x0_prev2, corrector, table, *, prediction=PRED_EPSILON,
                 clip_denoised: bool = False, x_prev=None, block: int | None = None, guidance_scale: float = 1.0):
    """Launch the fused UniPC-3 step. ``x0_prev``, ``x0_prev2`` and ``corrector`` (shaped as x,
    contiguous; zeros at the start of a run) are read and overwritten in place (x0_prev2 <- x0_prev
    <- this step's x0; the next step's corrector). ``table`` is DeviceTables.packed (fp32),
    ``prediction`` a code of common.PREDICTION_CODE; ``i`` is not advanced here (see
    common.advance). Returns (x_prev, x0, corrector); ``x_prev=x`` steps in place."""
    if x0_prev is None or x0_prev2 is None or corrector is None:
        raise InvalidRequestError("the UniPC-3 step keeps each sample's two previous x0 and its corrector in "
                                  "x0_prev, x0_prev2 and corrector (stepping.Rows): allocate them (zeros, shaped "
                                  "as x) before the first step")
    x_prev = torch.empty_like(x) if x_prev is None else x_prev
    check_inputs(x, i, table, x_prev=x_prev, x0_prev=x0_prev, x0_prev2=x0_prev2,
                 corrector=corrector)
    prediction_part, _, out_stride, guidance_scale, guided = output_parts(model_output, x, None, guidance_scale)
    block = block or block_for(x[0].numel())
    _unipc_3_step_kernel[grid_for(x, block)](
        x, prediction_part, x0_prev, x0_prev2, corrector, x_prev, i, table, x[0].numel(), out_stride, guidance_scale,
        PRED=prediction, GUIDED=guided, CLIP=bool(clip_denoised), BLOCK=block, enable_fp_fusion=FP_FUSION,
    )
    return x_prev, x0_prev, corrector


def step_rows(spec, prediction, table, rows, model_output, x0=None, guidance_scale=1.0):
    """The engine's "unipc_3" step (samplers.SamplerDef.kernel; kernels.triton_step documents the
    signature): rows.x and its three states stepped in place; returns rows.x0_prev when ``x0`` is
    given (the x0 is always written there), else None."""
    unipc_3_step(rows.x, model_output, rows.i, rows.x0_prev, rows.x0_prev2, rows.corrector, table,
                 prediction=prediction, clip_denoised=spec.clip_denoised, x_prev=rows.x, guidance_scale=guidance_scale)
    return None if x0 is None else rows.x0_prev


def launches(t):
    """Every compile-time choice ``unipc_3_step`` can pass its kernel, as launches on stand-in tensors
    ``t`` (x, model_output, i, seed_words, table, x0_prev of one I/O dtype): for the sm_90 compile check."""
    for pred, clip, guided in itertools.product(PREDICTION_CODE.values(), (False, True), (False, True)):
        yield lambda p=pred, c=clip, g=guided: unipc_3_step(
            t.x, guided_stand_in(t.model_output, g), t.i, t.x0_prev, torch.zeros_like(t.x0_prev),
            torch.zeros_like(t.x0_prev), t.table, prediction=p, clip_denoised=c,
            guidance_scale=STAND_IN_SCALE if g else 1.0)
