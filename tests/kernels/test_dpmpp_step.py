"""Fused DPM-Solver++(2M) steps, ODE and SDE, against their references (engine.samplers.dpmpp_2m_step,
dpmpp_2m_sde_step)."""

import random

import pytest
import torch

from ddpm_engine.kernels.common import advance
from ddpm_engine.kernels.dpmpp_step import dpmpp_2m_step, reference, reference_sde
from ddpm_engine.noise import SDE_STEP
from ddpm_engine.samplers import Prediction

from .helpers import PREDICTION_CODE, poisoned, random_case, reference_noise

pytestmark = pytest.mark.usefixtures("seeded")


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("clip", [False, True])
def test_matches_reference(prediction, clip):
    """Mixed step indices in one batch (always the first step, steps - 1, and the last, 0), a sample
    size spread over several blocks with a ragged tail, every prediction type, clip on and off."""
    tab, x, out, i, _ = random_case(B=6, spacing="linspace")
    x0_prev = torch.randn_like(x)
    want, want_x0 = reference(tab, x, out, i, x0_prev, prediction=prediction, clip_denoised=clip)
    x_prev = poisoned(x)
    state = x0_prev.clone()
    _, x0 = dpmpp_2m_step(x, out, i, state, tab.packed, prediction=PREDICTION_CODE[prediction],
                          clip_denoised=clip, x_prev=x_prev, block=random.choice([16, 32, 64]))
    assert x0 is state  # the new x0 replaces the previous one in place
    torch.testing.assert_close(x_prev, want, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(state, want_x0, rtol=1e-5, atol=3e-5)


def test_first_order_steps_ignore_a_stale_x0_prev():
    """On the first and the last step the previous x0 has coefficient 0 and is not read: NaN there
    cannot leak into x_prev (the kernel masks the load; the reference masks the product)."""
    tab, x, out, _, _ = random_case(B=2, steps=17, spacing="linspace")
    i = torch.tensor([0, 16], device=x.device)
    stale = poisoned(x)
    want, _ = reference(tab, x, out, i, stale)
    assert torch.isfinite(want).all()
    got, _ = dpmpp_2m_step(x, out, i, stale.clone(), tab.packed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=3e-5)


def test_a_short_run_in_place_matches_the_reference_run():
    """Steps in place (x_prev = x, the state carried by the kernel) over a whole run equal the
    reference run, for samples started at different steps within one batch."""
    steps = 8
    tab, x, _, _, _ = random_case(B=3, shape=(2, 6, 5), steps=steps, spacing="linspace")
    i = torch.tensor([steps - 1, steps - 1, steps - 3], device=x.device)
    model = lambda x, i: torch.tanh(1.5 * x) * (1 + 0.1 * i.view(-1, 1, 1, 1))  # noqa: E731
    x_ref, i_ref, state_ref = x.clone(), i.clone(), torch.zeros_like(x)
    state = torch.zeros_like(x)
    for _ in range(steps):
        x_ref, state_ref = reference(tab, x_ref, model(x_ref, i_ref), i_ref, state_ref, prediction=Prediction.V)
        i_ref = (i_ref - 1).clamp(min=0)
        dpmpp_2m_step(x, model(x, i), i, state, tab.packed, prediction=PREDICTION_CODE[Prediction.V], x_prev=x)
        advance(i)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, state_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_io(dtype):
    """fp16 / bf16 sample and model output (math in fp32; the x0 state stays fp32)."""
    tab, x, out, i, _ = random_case(dtype=dtype, spacing="linspace")
    x0_prev = torch.randn(x.shape, device=x.device)
    want, want_x0 = reference(tab, x.float(), out.float(), i, x0_prev, clip_denoised=True)
    x_prev, state = poisoned(x), x0_prev.clone()
    dpmpp_2m_step(x, out, i, state, tab.packed, clip_denoised=True, x_prev=x_prev)
    assert x_prev.dtype == dtype
    torch.testing.assert_close(x_prev.float(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(state, want_x0, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("prediction", list(Prediction))
def test_sde_matches_reference_with_the_engine_noise(prediction):
    """The SDE form draws its noise in the kernel: the sample's Philox stream at counters
    SDE_STEP + i (engine.noise), which the reference gets as a tensor. Mixed steps, clip random."""
    tab, x, out, i, words = random_case(B=5, spacing="linspace")
    clip = random.choice([False, True])
    x0_prev = torch.randn_like(x)
    noise = reference_noise(words, i + SDE_STEP, x)
    want, want_x0 = reference_sde(tab, x, out, i, x0_prev, noise, prediction=prediction, clip_denoised=clip)
    x_prev, state = poisoned(x), x0_prev.clone()
    dpmpp_2m_step(x, out, i, state, tab.packed, prediction=PREDICTION_CODE[prediction], clip_denoised=clip,
                  x_prev=x_prev, seed_words=words, block=random.choice([16, 64]))
    torch.testing.assert_close(x_prev, want, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(state, want_x0, rtol=1e-5, atol=3e-5)
    # the noise is not DDPM's of the same seed and step, and the last step (i = 0) lands on x0 without it
    assert not torch.allclose(noise, reference_noise(words, i, x))
    torch.testing.assert_close(x_prev[0], want_x0[0], rtol=1e-5, atol=3e-5)
