"""Fused DDIM step against engine.samplers.ddim_step with the engine's noise."""

import random

import pytest
import torch

from ddpm_engine.samplers import Prediction, ddim_step
from ddpm_engine.kernels import ddim_step as kernel
from ddpm_engine.kernels.ddpm_step import PRED_EPSILON, PRED_SAMPLE, PRED_V

from .helpers import poisoned, random_case, reference_noise

PRED = {Prediction.EPSILON: PRED_EPSILON, Prediction.SAMPLE: PRED_SAMPLE, Prediction.V: PRED_V}


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("eta", [0.0, 1.0, "random"])
@pytest.mark.parametrize("clip", [False, True])
def test_matches_reference(prediction, eta, clip):
    eta = random.uniform(0.05, 0.95) if eta == "random" else eta
    tab, x, out, i, words = random_case()
    want, want_x0 = ddim_step(tab, x, out, i, reference_noise(words, i, x), eta=eta, prediction=prediction,
                              clip_denoised=clip)
    x_prev, x0 = poisoned(x), poisoned(x)
    kernel.ddim_step(x, out, i, words, tab.packed, eta=eta, prediction=PRED[prediction], clip_denoised=clip,
                     x_prev=x_prev, x0=x0, block=random.choice([32, 64]))
    torch.testing.assert_close(x_prev, want, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(x0, want_x0, rtol=1e-5, atol=3e-5)


def test_half_precision_io():
    tab, x, out, i, words = random_case(dtype=torch.float16)
    want, _ = ddim_step(tab, x.float(), out.float(), i, reference_noise(words, i, x), eta=0.5)
    x_prev = poisoned(x)
    kernel.ddim_step(x, out, i, words, tab.packed, eta=0.5, x_prev=x_prev, store_x0=False)
    torch.testing.assert_close(x_prev.float(), want, rtol=2e-2, atol=2e-2)
