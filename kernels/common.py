"""What every fused step kernel shares: the table layout, the per-sample prologue, the x0 / eps
prediction, the in-kernel noise, and the host-side launch helpers.

Layout: x_t and every output are flat [B, N] buffers (N elements per sample). The model output
is [B, C or 2C, ...]: with a learned variance a model outputs 2C channels, [prediction, variance
part] (engine.samplers.model_output_parts says which channels are which). Kernels read it as
views with a per-sample stride (``output_parts``, ``load_output``): sample b's prediction at
prediction + b * OUT_STRIDE + e, so the first C channels of a 2C output are read in place, no copy.
With classifier-free guidance (GUIDED) the output holds 2B rows, the conditional ones then the
unconditional ones (engine.guidance.guided), and ``load_output`` reads sample b's two rows, b and
b + B, and combines them as it loads them: the guidance costs one more read of the prediction and
no pass of its own; without it the kernels compile without that read (a constexpr switch).
The grid is 2-D, (sample b, block of elements), so a program serves one sample and gathers that
sample's row of the packed coefficient table (schedules.DeviceTables.packed, columns in
schedules.COLUMNS) once, at the sample's own step index i: samples of one batch may sit at
different steps. Column indices and prediction codes are compile-time constants named here.
"""

import torch
import triton
import triton.language as tl

from ddpm_engine.errors import InvalidRequestError
from ddpm_engine.noise import PHILOX_ROUNDS
from ddpm_engine.samplers import model_output_parts
from ddpm_engine.schedules import COLUMNS, Prediction, Variance
from ddpm_engine.guidance import conditional_rows

from .options import FP_FUSION
from .philox import PHILOX_KEY, philox_normal

# What the network outputs (engine.schedules.Prediction), as the kernels' PRED constant.
PRED_EPSILON = tl.constexpr(0)
PRED_SAMPLE = tl.constexpr(1)
PRED_V = tl.constexpr(2)
PREDICTION_CODE = {Prediction.EPSILON: PRED_EPSILON, Prediction.SAMPLE: PRED_SAMPLE, Prediction.V: PRED_V}

# DDPM's reverse variance (engine.schedules.Variance), as the DDPM kernel's VARIANCE constant.
VAR_FIXED_SMALL = tl.constexpr(0)
VAR_FIXED_LARGE = tl.constexpr(1)
VAR_LEARNED = tl.constexpr(2)
VAR_LEARNED_RANGE = tl.constexpr(3)
VARIANCE_CODE = {Variance.FIXED_SMALL: VAR_FIXED_SMALL, Variance.FIXED_LARGE: VAR_FIXED_LARGE,
                 Variance.LEARNED: VAR_LEARNED, Variance.LEARNED_RANGE: VAR_LEARNED_RANGE}

# The packed table's row length and column indices (schedules.COLUMNS).
NCOLS = tl.constexpr(len(COLUMNS))
COL_SQRT_ABAR = tl.constexpr(COLUMNS.index("sqrt_alphas_cumprod"))
COL_SQRT_1M_ABAR = tl.constexpr(COLUMNS.index("sqrt_one_minus_alphas_cumprod"))
COL_SQRT_RECIP_ABAR = tl.constexpr(COLUMNS.index("sqrt_recip_alphas_cumprod"))
COL_SQRT_RECIPM1_ABAR = tl.constexpr(COLUMNS.index("sqrt_recipm1_alphas_cumprod"))
COL_POSTERIOR_COEF1 = tl.constexpr(COLUMNS.index("posterior_mean_coef1"))
COL_POSTERIOR_COEF2 = tl.constexpr(COLUMNS.index("posterior_mean_coef2"))
COL_SMALL_LOG_VARIANCE = tl.constexpr(COLUMNS.index("posterior_log_variance_clipped"))
COL_LARGE_LOG_VARIANCE = tl.constexpr(COLUMNS.index("large_log_variance"))
COL_ABAR = tl.constexpr(COLUMNS.index("alphas_cumprod"))
COL_DDIM_ABAR_PREV = tl.constexpr(COLUMNS.index("ddim_alphas_cumprod_prev"))
COL_DPMPP_X = tl.constexpr(COLUMNS.index("dpmpp_coef_x"))
COL_DPMPP_X0 = tl.constexpr(COLUMNS.index("dpmpp_coef_x0"))
COL_DPMPP_X0_PREV = tl.constexpr(COLUMNS.index("dpmpp_coef_x0_prev"))
COL_SDE_X = tl.constexpr(COLUMNS.index("sde_coef_x"))
COL_SDE_X0 = tl.constexpr(COLUMNS.index("sde_coef_x0"))
COL_SDE_X0_PREV = tl.constexpr(COLUMNS.index("sde_coef_x0_prev"))
COL_SDE_NOISE_STD = tl.constexpr(COLUMNS.index("sde_noise_std"))
COL_UNIPC_CORR_X0 = tl.constexpr(COLUMNS.index("unipc_corr_x0"))
COL_UNIPC_NEXT_X = tl.constexpr(COLUMNS.index("unipc_next_x"))
COL_UNIPC_NEXT_X0 = tl.constexpr(COLUMNS.index("unipc_next_x0"))
COL_UNIPC_NEXT_X0_PREV = tl.constexpr(COLUMNS.index("unipc_next_x0_prev"))

KEY64 = tl.constexpr(PHILOX_KEY)
ROUNDS = tl.constexpr(PHILOX_ROUNDS)


@triton.jit
def step_prologue(i_ptr, table_ptr, N, BLOCK: tl.constexpr):
    """This program's sample b, its step index i, a pointer to its table row, and its elements:
    offsets within the sample, their mask (offs < N) and their flat index into [B, N]."""
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    i = tl.load(i_ptr + b)
    row = table_ptr + i * NCOLS
    flat = b.to(tl.int64) * N + offs
    return b, i, row, offs, mask, flat


@triton.jit
def predict_x0_and_eps(x, out, row, PRED: tl.constexpr):
    """x0 and eps implied by the model output (engine.samplers.predict_x0_and_eps), before clipping.
    A kernel that uses only one of them pays nothing for the other (the compiler drops it)."""
    sa = tl.load(row + COL_SQRT_ABAR)
    s1ma = tl.load(row + COL_SQRT_1M_ABAR)
    if PRED == PRED_EPSILON:
        eps = out
        x0 = tl.load(row + COL_SQRT_RECIP_ABAR) * x - tl.load(row + COL_SQRT_RECIPM1_ABAR) * out
    elif PRED == PRED_SAMPLE:
        x0 = out
        eps = (x - sa * x0) / s1ma
    else:
        x0 = sa * x - s1ma * out
        eps = sa * out + s1ma * x
    return x0, eps


@triton.jit
def load_output(ptr, b, offs, mask, out_stride, guidance_scale, GUIDED: tl.constexpr):
    """Sample b's elements ``offs`` of a model output part (``output_parts``: the prediction or the
    variance part), as fp32: ptr + b * out_stride + offs. GUIDED: the output holds 2B rows (B =
    the grid's samples) and this is uncond + guidance_scale * (cond - uncond) of row b (conditional)
    and row b + B (unconditional), engine.guidance.guided; a learned variance part is read with
    GUIDED false (the conditional row's, as ``guided`` keeps it)."""
    cond_ptr = ptr + b.to(tl.int64) * out_stride + offs
    out = tl.load(cond_ptr, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        uncond_ptr = cond_ptr + tl.num_programs(0).to(tl.int64) * out_stride
        uncond = tl.load(uncond_ptr, mask=mask, other=0.0).to(tl.float32)
        out = uncond + guidance_scale * (out - uncond)
    return out


@triton.jit
def step_noise(b, i, offs, seed_ptr):
    """Standard normals of sample b at step counter i for its elements ``offs``: the engine's
    Philox stream (engine.noise.philox_normal), counters (element, i, seed_lo, seed_hi)."""
    element = offs.to(tl.uint32)
    zero = tl.zeros_like(element)
    lo = tl.load(seed_ptr + 2 * b).to(tl.uint32) + zero
    hi = tl.load(seed_ptr + 2 * b + 1).to(tl.uint32) + zero
    return philox_normal(element, i.to(tl.uint32) + zero, lo, hi, KEY64, ROUNDS)


@triton.jit
def load_state(ptr, flat, offs, N, coef):
    """A multistep state (x0_prev, corrector) as fp32, read only where its coefficient is nonzero:
    on the steps that do not use it, none of it is read, so a fresh or stale buffer cannot leak in."""
    n = tl.where(coef != 0.0, N, 0)
    return tl.load(ptr + flat, mask=offs < n, other=0.0).to(tl.float32)


@triton.jit
def clip_x0(x0):
    """x0 clamped to [-1, 1] (clip_denoised / clip_sample)."""
    return tl.minimum(tl.maximum(x0, -1.0), 1.0)


@triton.jit
def _advance_kernel(i_ptr,  # int64 [B]: step indices, decremented in place, saturating at 0
                    B, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < B
    i = tl.load(i_ptr + offs, mask=mask, other=0)
    tl.store(i_ptr + offs, tl.maximum(i - 1, 0), mask=mask)


def advance(i):
    """i <- max(i - 1, 0) on the device, as a second, tiny launch after the step kernel.

    Why not inside the step kernel: all programs of sample b (one per block of elements) read
    i[b], and on a GPU they run in any order with no grid-wide barrier, so a program that
    decremented i[b] could do so before another program of the same sample has read it (that one
    would then gather the wrong coefficients and noise). Launches on one stream are ordered, so
    this kernel sees i only after every program of the step has read it. No host sync, no
    allocation: the step stays CUDA-graph capturable."""
    B = i.shape[0]
    _advance_kernel[(triton.cdiv(B, 256),)](i, B, BLOCK=256, enable_fp_fusion=FP_FUSION)


def launches(t):
    """Every launch ``advance`` can make (one), on the stand-in tensors ``t``: see ddpm_step.launches."""
    yield lambda: advance(t.i)


def block_for(numel: int) -> int:
    """Elements per program: the sample's size rounded up to a power of two, in [16, 1024]."""
    return max(16, min(1024, triton.next_power_of_2(numel)))


def grid_for(x, block: int):
    """(samples, blocks per sample) for a [B, ...] sample tensor."""
    return (x.shape[0], triton.cdiv(x[0].numel(), block))


def output_parts(model_output, x, variance=None, guidance_scale=1.0):
    """The model output as a kernel reads it: (prediction, variance part, per-sample stride
    OUT_STRIDE, guidance_scale as a float, GUIDED).

    Views of one contiguous [B, C or 2C, ...] output (engine.samplers.model_output_parts decides
    the parts and checks the width against ``variance``: None accepts either), no copy; the
    variance part is the prediction itself (a pointer the kernel never reads) when there is none.
    ``guidance_scale`` other than 1: the output is a guided call's [2B, ...] (conditional rows, then
    unconditional ones: engine.guidance.conditional_rows checks the rows) and GUIDED is true; the
    views start at its first row, the kernel finds row b + B one B * OUT_STRIDE further (``load_output``).
    Host metadata only."""
    if not isinstance(model_output, torch.Tensor):
        raise InvalidRequestError(f"model_output must be a tensor, got {type(model_output).__name__}")
    if not model_output.is_contiguous() or model_output.device != x.device:
        raise InvalidRequestError(f"model_output must be a contiguous tensor on {x.device}, got one on "
                                  f"{model_output.device} (contiguous={model_output.is_contiguous()})")
    guidance_scale = float(guidance_scale)
    prediction, variance_part = model_output_parts(conditional_rows(model_output, x, guidance_scale), x, variance)
    return (prediction, prediction if variance_part is None else variance_part, model_output[0].numel(),
            guidance_scale, guidance_scale != 1.0)


def check_inputs(x, i, table, seed_words=None, **per_element):
    """Host-side checks of shapes, dtypes, layout and device (metadata only: no sync). The kernels
    index flat [B, N] buffers, so every per-element tensor (x and ``per_element``; None skipped)
    must be contiguous and shaped as x."""
    B = x.shape[0]
    for name, t in {"x_t": x, **per_element}.items():
        if t is None:
            continue
        if t.shape != x.shape or not t.is_contiguous() or t.device != x.device:
            raise InvalidRequestError(f"{name} must be a contiguous tensor of shape {tuple(x.shape)} on {x.device}, "
                                      f"got {tuple(t.shape)} (contiguous={t.is_contiguous()}) on {t.device}")
    if i.dtype != torch.int64 or i.shape != (B,) or i.device != x.device:
        raise InvalidRequestError(f"i must be int64 [{B}] on {x.device}, got {i.dtype} {tuple(i.shape)} on {i.device}")
    if seed_words is not None and (seed_words.dtype != torch.int64 or seed_words.shape != (B, 2)
                                   or not seed_words.is_contiguous() or seed_words.device != x.device):
        raise InvalidRequestError(f"seed_words must be contiguous int64 [{B}, 2] on {x.device} "
                                  "(engine.noise.seed_words)")
    if (table.dtype != torch.float32 or table.ndim != 2 or table.shape[1] != len(COLUMNS) or not table.is_contiguous()
            or table.device != x.device):
        raise InvalidRequestError(f"table must be DeviceTables.packed: contiguous float32 [steps, {len(COLUMNS)}] "
                                  f"on {x.device}")


STAND_IN_SCALE = 2.0  # the guidance scale of the guided launches in ``launches(t)`` (any scale other than 1)


def guided_stand_in(model_output, guided: bool):
    """A launch's model output in ``launches(t)`` (the sm_90 compile check): the stand-in output,
    or with ``guided`` a guided call's 2B rows (engine.guidance.guided's layout) built from it."""
    return torch.cat([model_output, model_output]) if guided else model_output
