"""Fused DDPM step against its reference (engine.samplers.ddpm_step) with the engine's noise."""

import random

import pytest
import torch

from ddpm_engine.kernels.common import advance
from ddpm_engine.kernels.ddpm_step import ddpm_step, reference
from ddpm_engine.samplers import Prediction, Variance

from .helpers import PREDICTION_CODE, poisoned, random_case, reference_noise

pytestmark = pytest.mark.usefixtures("seeded")


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("variance", list(Variance))
@pytest.mark.parametrize("clip", [False, True])
def test_matches_reference(prediction, variance, clip):
    tab, x, out, i, words = random_case()
    want, want_x0 = reference(tab, x, out, i, reference_noise(words, i, x), prediction=prediction,
                              variance=variance, clip_denoised=clip)
    x_prev, x0 = poisoned(x), poisoned(x)
    ddpm_step(x, out, i, words, tab.packed, prediction=PREDICTION_CODE[prediction], variance=variance.value,
              clip_denoised=clip, x_prev=x_prev, x0=x0, block=random.choice([32, 64]))
    torch.testing.assert_close(x_prev, want, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(x0, want_x0, rtol=1e-5, atol=2e-5)


def test_in_place_and_x0_only_when_asked_and_advance():
    tab, x, out, i, words = random_case(B=3, shape=(1, 9, 11))
    want, _ = reference(tab, x, out, i, reference_noise(words, i, x))
    i_before = i.clone()
    x_prev, x0 = ddpm_step(x, out, i, words, tab.packed, x_prev=x, store_x0=False)
    assert x_prev is x and x0 is None
    torch.testing.assert_close(x, want, rtol=1e-5, atol=2e-5)
    assert torch.equal(i, i_before)  # the step kernel only reads i
    advance(i)
    assert torch.equal(i, (i_before - 1).clamp(min=0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_io(dtype):
    """fp16 and bf16 I/O (math in fp32); Triton's interpreter runs both on the CPU."""
    tab, x, out, i, words = random_case(dtype=dtype)
    want, _ = reference(tab, x.float(), out.float(), i, reference_noise(words, i, x), clip_denoised=True)
    x_prev = poisoned(x)
    ddpm_step(x, out, i, words, tab.packed, clip_denoised=True, x_prev=x_prev, store_x0=False)
    assert x_prev.dtype == dtype
    torch.testing.assert_close(x_prev.float(), want, rtol=2e-2, atol=2e-2)
