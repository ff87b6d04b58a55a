"""Fused DDPM step against engine.samplers.ddpm_step with the engine's noise."""

import random

import pytest
import torch

from ddpm_engine.samplers import Prediction, Variance, ddpm_step
from ddpm_engine.kernels import ddpm_step as kernel

from .helpers import poisoned, random_case, reference_noise

PRED = {Prediction.EPSILON: kernel.PRED_EPSILON, Prediction.SAMPLE: kernel.PRED_SAMPLE, Prediction.V: kernel.PRED_V}


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("variance", list(Variance))
@pytest.mark.parametrize("clip", [False, True])
def test_matches_reference(prediction, variance, clip):
    tab, x, out, i, words = random_case()
    want, want_x0 = ddpm_step(tab, x, out, i, reference_noise(words, i, x), prediction=prediction,
                              variance=variance, clip_denoised=clip)
    x_prev, x0 = poisoned(x), poisoned(x)
    kernel.ddpm_step(x, out, i, words, tab.packed, prediction=PRED[prediction], variance=variance.value,
                     clip_denoised=clip, x_prev=x_prev, x0=x0, block=random.choice([32, 64]))
    torch.testing.assert_close(x_prev, want, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(x0, want_x0, rtol=1e-5, atol=2e-5)


def test_in_place_and_x0_only_when_asked_and_advance():
    tab, x, out, i, words = random_case(B=3, shape=(1, 9, 11))
    want, _ = ddpm_step(tab, x, out, i, reference_noise(words, i, x))
    i_before = i.clone()
    x_prev, x0 = kernel.ddpm_step(x, out, i, words, tab.packed, x_prev=x, store_x0=False)
    assert x_prev is x and x0 is None
    torch.testing.assert_close(x, want, rtol=1e-5, atol=2e-5)
    assert torch.equal(i, i_before)  # the step kernel only reads i
    kernel.advance(i)
    assert torch.equal(i, (i_before - 1).clamp(min=0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_io(dtype):
    tab, x, out, i, words = random_case(dtype=dtype)
    want, _ = ddpm_step(tab, x.float(), out.float(), i, reference_noise(words, i, x), clip_denoised=True)
    x_prev = poisoned(x)
    try:
        kernel.ddpm_step(x, out, i, words, tab.packed, clip_denoised=True, x_prev=x_prev, store_x0=False)
    except Exception as exc:  # the interpreter may not load bf16; the GPU suite covers it
        if dtype is torch.bfloat16 and x.device.type == "cpu":
            pytest.skip(f"Triton's interpreter cannot run bf16 I/O here: {type(exc).__name__}")
        raise
    assert x_prev.dtype == dtype
    torch.testing.assert_close(x_prev.float(), want, rtol=2e-2, atol=2e-2)
