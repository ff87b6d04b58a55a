"""Fused DPM-Solver++(3M) step against its reference (engine.samplers.dpmpp_3m_step)."""

import random

import pytest
import torch

from ddpm_engine.kernels.common import advance
from ddpm_engine.kernels.dpmpp_3m_step import dpmpp_3m_step, reference
from ddpm_engine.samplers import Prediction

from .helpers import PREDICTION_CODE, poisoned, random_case

pytestmark = pytest.mark.usefixtures("seeded")


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("clip", [False, True])
def test_matches_reference(prediction, clip):
    """Mixed step indices (always the first and the last step), a ragged sample size over several
    blocks, every prediction type, clip on and off; x_prev and both shifted states checked."""
    tab, x, out, i, _ = random_case(B=6, spacing="linspace", steps=random.choice([17, 8, 50]))
    x0_prev, x0_prev2 = torch.randn_like(x), torch.randn_like(x)
    want, want_x0 = reference(tab, x, out, i, x0_prev, x0_prev2, prediction=prediction, clip_denoised=clip)
    x_prev, s1, s2 = poisoned(x), x0_prev.clone(), x0_prev2.clone()
    _, x0 = dpmpp_3m_step(x, out, i, s1, s2, tab.packed, prediction=PREDICTION_CODE[prediction], clip_denoised=clip,
                          x_prev=x_prev, block=random.choice([16, 32, 64]))
    assert x0 is s1
    torch.testing.assert_close(x_prev, want, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(s1, want_x0, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(s2, x0_prev)  # shifted: x0_prev2 <- x0_prev


def test_lower_order_steps_read_no_older_x0():
    """First step: neither state has a coefficient; second step: x0_prev2 has none. NaN there
    cannot leak in (the kernel masks the load and the product, the reference the product)."""
    steps = 9
    tab, x, out, _, _ = random_case(B=2, steps=steps, spacing="linspace")
    for k, (s1, s2) in enumerate([(poisoned(x), poisoned(x)), (torch.randn_like(x), poisoned(x))]):
        i = torch.full((2,), steps - 1 - k, device=x.device)
        want, _ = reference(tab, x, out, i, s1, s2)
        assert torch.isfinite(want).all()
        got, _ = dpmpp_3m_step(x, out, i, s1.clone(), s2.clone(), tab.packed)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=3e-5)


def test_a_short_run_in_place_matches_the_reference_run():
    """Steps in place over a whole run equal the reference run, samples started at different steps."""
    steps = 8
    tab, x, _, _, _ = random_case(B=3, shape=(2, 6, 5), steps=steps, spacing="linspace")
    i = torch.tensor([steps - 1, steps - 1, steps - 3], device=x.device)
    model = lambda x, i: torch.tanh(1.5 * x) * (1 + 0.1 * i.view(-1, 1, 1, 1))  # noqa: E731
    x_ref, i_ref, r1, r2 = x.clone(), i.clone(), torch.zeros_like(x), torch.zeros_like(x)
    s1, s2 = torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(steps):
        x_ref, x0 = reference(tab, x_ref, model(x_ref, i_ref), i_ref, r1, r2, prediction=Prediction.V)
        r1, r2 = x0, r1
        i_ref = (i_ref - 1).clamp(min=0)
        dpmpp_3m_step(x, model(x, i), i, s1, s2, tab.packed, prediction=PREDICTION_CODE[Prediction.V], x_prev=x)
        advance(i)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s2, r2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_io(dtype):
    """fp16 / bf16 sample and model output (math in fp32; the states stay fp32)."""
    tab, x, out, i, _ = random_case(dtype=dtype, spacing="linspace")
    s1, s2 = torch.randn(x.shape, device=x.device), torch.randn(x.shape, device=x.device)
    want, _ = reference(tab, x.float(), out.float(), i, s1, s2, clip_denoised=True)
    x_prev = poisoned(x)
    dpmpp_3m_step(x, out, i, s1.clone(), s2.clone(), tab.packed, clip_denoised=True, x_prev=x_prev)
    assert x_prev.dtype == dtype
    torch.testing.assert_close(x_prev.float(), want, rtol=2e-2, atol=2e-2)
