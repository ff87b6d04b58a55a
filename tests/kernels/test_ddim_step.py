"""Fused DDIM step against its reference (engine.samplers.ddim_step) with the engine's noise."""

import random

import pytest
import torch

from ddpm_engine.kernels.ddim_step import ddim_step, reference
from ddpm_engine.samplers import Prediction

from .helpers import PREDICTION_CODE, poisoned, random_case, reference_noise

pytestmark = pytest.mark.usefixtures("seeded")


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("eta", [0.0, 1.0, "random"])
@pytest.mark.parametrize("clip,use_clipped", [(False, False), (True, False), (True, True)])
def test_matches_reference(prediction, eta, clip, use_clipped):
    eta = random.uniform(0.05, 0.95) if eta == "random" else eta
    tab, x, out, i, words = random_case()
    if clip:
        out = 3 * out  # x0 beyond [-1, 1] for many elements, so the clip and use_clipped matter
    want, want_x0 = reference(tab, x, out, i, reference_noise(words, i, x), eta=eta, prediction=prediction,
                              clip_denoised=clip, use_clipped_model_output=use_clipped)
    x_prev, x0 = poisoned(x), poisoned(x)
    ddim_step(x, out, i, words, tab.packed, eta=eta, prediction=PREDICTION_CODE[prediction], clip_denoised=clip,
              use_clipped_model_output=use_clipped, x_prev=x_prev, x0=x0, block=random.choice([32, 64]))
    torch.testing.assert_close(x_prev, want, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(x0, want_x0, rtol=1e-5, atol=3e-5)


def test_use_clipped_model_output_changes_the_step():
    """The option is live in the kernel: with clipping, eps from the clipped x0 gives another x_prev."""
    tab, x, out, i, words = random_case(steps=50)
    i = torch.full_like(i, 30)
    a, _ = ddim_step(x, 3 * out, i, words, tab.packed, clip_denoised=True, use_clipped_model_output=False)
    b, _ = ddim_step(x, 3 * out, i, words, tab.packed, clip_denoised=True, use_clipped_model_output=True)
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_io(dtype):
    tab, x, out, i, words = random_case(dtype=dtype)
    want, _ = reference(tab, x.float(), out.float(), i, reference_noise(words, i, x), eta=0.5)
    x_prev = poisoned(x)
    ddim_step(x, out, i, words, tab.packed, eta=0.5, x_prev=x_prev, store_x0=False)
    assert x_prev.dtype == dtype
    torch.testing.assert_close(x_prev.float(), want, rtol=2e-2, atol=2e-2)
