"""Fused DDPM ancestral step: one kernel per reverse step, noise generated inside.

Reference (engine.samplers.ddpm_step, the specification), per element of sample b at step index i:

    x0     = sqrt_recip[i] * x - sqrt_recipm1[i] * eps      (or x0 = out, or from v)   read x, out
    x0     = clamp(x0, -1, 1)                                 (optional)
    mean   = coef1[i] * x0 + coef2[i] * x                     (DDPM eq. 7)
    x_prev = mean + (i != 0) * exp(0.5 * logvar[i]) * z      z: Philox(e, i, seed_b)  write x_prev

Memory traffic per element, s = itemsize of the I/O dtype (4 fp32, 2 fp16/bf16):
read x_t and the model output (2 s), write x_prev (s), plus s for x0 only when STORE_X0: 3 s bytes
(12 in fp32). Per sample, once per program: i (8 bytes), the seed words (16), 7 table entries (28),
all cache hits after the first program of a sample. The torch reference reads x, out and a
materialised noise tensor and writes noise, x0, several temporaries and x_prev: about 10 passes.
Coefficients come from the packed device table (schedules.DeviceTables.packed) gathered by the
kernel at each sample's own step index, so samples of one batch may sit at different steps.
The grid is 2-D, (sample, block of elements), so each program gathers one sample's row once.
"""

import torch
import triton
import triton.language as tl

from ddpm_engine.noise import PHILOX_ROUNDS
from ddpm_engine.schedules import COLUMNS

from .philox import PHILOX_KEY, philox_normal

PRED_EPSILON, PRED_SAMPLE, PRED_V = 0, 1, 2


@triton.jit
def predict_x0(x, out, sa, s1ma, srecip, srecipm1, PRED: tl.constexpr):
    """x0 implied by the model output (engine.samplers.predict_x0_and_eps)."""
    if PRED == 0:
        x0 = srecip * x - srecipm1 * out
    elif PRED == 1:
        x0 = out
    else:
        x0 = sa * x - s1ma * out
    return x0


@triton.jit
def _ddpm_step_kernel(
    x_ptr,        # [B, N] x_t (fp32 / fp16 / bf16)
    out_ptr,      # [B, N] model output, same layout
    xprev_ptr,    # [B, N] out: x_{t-1}, x's dtype
    x0_ptr,       # [B, N] out: predicted x0 (only written when STORE_X0)
    i_ptr,        # int64 [B]: each sample's step index (read only here)
    seed_ptr,     # int64 [B, 2]: each sample's seed words (lo, hi)
    table_ptr,    # fp32 [steps, NCOLS]: packed coefficient table
    N,            # elements per sample
    NCOLS: tl.constexpr, C_SA: tl.constexpr, C_S1MA: tl.constexpr, C_SRECIP: tl.constexpr,
    C_SRECIPM1: tl.constexpr, C_COEF1: tl.constexpr, C_COEF2: tl.constexpr, C_LOGVAR: tl.constexpr,
    PRED: tl.constexpr, CLIP: tl.constexpr, STORE_X0: tl.constexpr,
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
    coef1 = tl.load(row + C_COEF1)
    coef2 = tl.load(row + C_COEF2)
    std = tl.exp(0.5 * tl.load(row + C_LOGVAR)) * (i != 0).to(tl.float32)  # no noise at i == 0

    base = b.to(tl.int64) * N + offs
    x = tl.load(x_ptr + base, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + base, mask=mask, other=0.0).to(tl.float32)
    x0 = predict_x0(x, out, sa, s1ma, srecip, srecipm1, PRED)
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
    mean = coef1 * x0 + coef2 * x

    element = offs.to(tl.uint32)
    zero = tl.zeros_like(element)
    step = i.to(tl.uint32) + zero
    lo = tl.load(seed_ptr + 2 * b).to(tl.uint32) + zero
    hi = tl.load(seed_ptr + 2 * b + 1).to(tl.uint32) + zero
    z = philox_normal(element, step, lo, hi, KEY64, ROUNDS)

    x_prev = mean + std * z
    tl.store(xprev_ptr + base, x_prev.to(xprev_ptr.dtype.element_ty), mask=mask)
    if STORE_X0:
        tl.store(x0_ptr + base, x0.to(x0_ptr.dtype.element_ty), mask=mask)


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
    _advance_kernel[(triton.cdiv(B, 256),)](i, B, BLOCK=256)


def block_for(numel: int) -> int:
    """Elements per program: the sample's size rounded up to a power of two, in [16, 1024]."""
    return max(16, min(1024, triton.next_power_of_2(numel)))


def check_inputs(x, model_output, i, seed_words, table, x_prev, x0):
    """Host-side checks of shapes, dtypes, layout and device (metadata only: no sync). The kernels
    index flat [B, N] buffers, so every per-element tensor must be contiguous."""
    from ddpm_engine.errors import InvalidRequestError

    B = x.shape[0]
    per_element = {"x_t": x, "model_output": model_output, "x_prev": x_prev}
    if x0 is not None:
        per_element["x0"] = x0
    for name, t in per_element.items():
        if t.shape != x.shape or not t.is_contiguous() or t.device != x.device:
            raise InvalidRequestError(f"{name} must be a contiguous tensor of shape {tuple(x.shape)} on {x.device}, "
                                      f"got {tuple(t.shape)} (contiguous={t.is_contiguous()}) on {t.device}")
    if i.dtype != torch.int64 or i.shape != (B,) or i.device != x.device:
        raise InvalidRequestError(f"i must be int64 [{B}] on {x.device}, got {i.dtype} {tuple(i.shape)} on {i.device}")
    if (seed_words.dtype != torch.int64 or seed_words.shape != (B, 2) or not seed_words.is_contiguous()
            or seed_words.device != x.device):
        raise InvalidRequestError(f"seed_words must be contiguous int64 [{B}, 2] on {x.device} (engine.noise.seed_words)")
    if (table.dtype != torch.float32 or table.ndim != 2 or table.shape[1] != len(COLUMNS) or not table.is_contiguous()
            or table.device != x.device):
        raise InvalidRequestError(f"table must be DeviceTables.packed: contiguous float32 [steps, {len(COLUMNS)}] "
                                  f"on {x.device}")


def ddpm_step(x, model_output, i, seed_words, table, *, prediction: int = PRED_EPSILON,
              variance: str = "fixed_small", clip_denoised: bool = False, x_prev=None, x0=None,
              store_x0: bool = True, block: int | None = None):
    """Launch the fused DDPM step. ``table`` is DeviceTables.packed (fp32); ``i`` int64 [B] is NOT
    advanced here (call ``advance(i)``). Returns (x_prev, x0 or None); pass ``x_prev`` / ``x0`` to
    write into preallocated buffers (CUDA-graph friendly); ``x_prev=x`` steps in place (each element
    is read and then written by the same program, so that is safe)."""
    B = x.shape[0]
    N = x[0].numel()
    x_prev = torch.empty_like(x) if x_prev is None else x_prev
    if store_x0 and x0 is None:
        x0 = torch.empty_like(x)
    check_inputs(x, model_output, i, seed_words, table, x_prev, x0 if store_x0 else None)
    block = block or block_for(N)
    col = {name: k for k, name in enumerate(COLUMNS)}
    logvar = "posterior_log_variance_clipped" if variance == "fixed_small" else "large_log_variance"
    grid = (B, triton.cdiv(N, block))
    _ddpm_step_kernel[grid](
        x, model_output, x_prev, x0 if store_x0 else x_prev, i, seed_words, table, N,  # x_prev: dummy x0
        NCOLS=len(COLUMNS), C_SA=col["sqrt_alphas_cumprod"], C_S1MA=col["sqrt_one_minus_alphas_cumprod"],
        C_SRECIP=col["sqrt_recip_alphas_cumprod"], C_SRECIPM1=col["sqrt_recipm1_alphas_cumprod"],
        C_COEF1=col["posterior_mean_coef1"], C_COEF2=col["posterior_mean_coef2"], C_LOGVAR=col[logvar],
        PRED=prediction, CLIP=bool(clip_denoised), STORE_X0=bool(store_x0),
        KEY64=PHILOX_KEY, ROUNDS=PHILOX_ROUNDS, BLOCK=block,
    )
    return x_prev, (x0 if store_x0 else None)
