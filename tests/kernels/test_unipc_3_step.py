"""Fused UniPC-3 step against its reference (engine.samplers.unipc_3_step)."""

import random

import pytest
import torch

from ddpm_engine.kernels.common import advance
from ddpm_engine.kernels.unipc_3_step import reference, unipc_3_step
from ddpm_engine.samplers import Prediction

from .helpers import PREDICTION_CODE, poisoned, random_case

pytestmark = pytest.mark.usefixtures("seeded")


@pytest.mark.parametrize("prediction", list(Prediction))
def test_matches_reference(prediction):
    """Mixed step indices (always the first and the last step), a ragged sample size over several
    blocks, every prediction type, clip on or off; x_prev and all three states checked."""
    tab, x, out, i, _ = random_case(B=6, spacing="linspace", steps=random.choice([17, 8, 50]))
    clip = random.choice([False, True])
    s1, s2, c = torch.randn_like(x), torch.randn_like(x), torch.randn_like(x)
    want, want_x0, want_c = reference(tab, x, out, i, s1, s2, c, prediction=prediction, clip_denoised=clip)
    x_prev, g1, g2, gc = poisoned(x), s1.clone(), s2.clone(), c.clone()
    _, x0, corr = unipc_3_step(x, out, i, g1, g2, gc, tab.packed, prediction=PREDICTION_CODE[prediction],
                               clip_denoised=clip, x_prev=x_prev, block=random.choice([16, 32, 64]))
    assert x0 is g1 and corr is gc
    torch.testing.assert_close(x_prev, want, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(g1, want_x0, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(g2, s1)
    torch.testing.assert_close(gc, want_c, rtol=1e-5, atol=3e-5)


def test_the_first_steps_read_no_state_they_do_not_use():
    """First step: no state has a coefficient; second: x0_prev2 has none. NaN there cannot leak in."""
    steps = 9
    tab, x, out, _, _ = random_case(B=2, steps=steps, spacing="linspace")
    cases = [(poisoned(x), poisoned(x), poisoned(x)), (torch.randn_like(x), poisoned(x), torch.randn_like(x))]
    for k, (s1, s2, c) in enumerate(cases):
        i = torch.full((2,), steps - 1 - k, device=x.device)
        want, _, want_c = reference(tab, x, out, i, s1, s2, c)
        assert torch.isfinite(want).all() and torch.isfinite(want_c).all()
        got, _, corr = unipc_3_step(x, out, i, s1.clone(), s2.clone(), c.clone(), tab.packed)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=3e-5)
        torch.testing.assert_close(corr, want_c, rtol=1e-5, atol=3e-5)


def test_a_short_run_in_place_matches_the_reference_run():
    """Steps in place over a whole run equal the reference run, samples started at different steps."""
    steps = 7
    tab, x, _, _, _ = random_case(B=3, shape=(2, 6, 5), steps=steps, spacing="linspace")
    i = torch.tensor([steps - 1, steps - 1, steps - 3], device=x.device)
    model = lambda x, i: torch.tanh(1.5 * x) * (1 + 0.1 * i.view(-1, 1, 1, 1))  # noqa: E731
    x_ref, i_ref = x.clone(), i.clone()
    ref_state = [torch.zeros_like(x) for _ in range(3)]
    state = [torch.zeros_like(x) for _ in range(3)]
    for _ in range(steps):
        x_ref, x0, corr = reference(tab, x_ref, model(x_ref, i_ref), i_ref, *ref_state, prediction=Prediction.SAMPLE)
        ref_state = [x0, ref_state[0], corr]
        i_ref = (i_ref - 1).clamp(min=0)
        unipc_3_step(x, model(x, i), i, *state, tab.packed, prediction=PREDICTION_CODE[Prediction.SAMPLE], x_prev=x)
        advance(i)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_io(dtype):
    """fp16 / bf16 sample and model output (math in fp32; the states stay fp32)."""
    tab, x, out, i, _ = random_case(dtype=dtype, spacing="linspace")
    state = [torch.randn(x.shape, device=x.device) for _ in range(3)]
    want, _, want_c = reference(tab, x.float(), out.float(), i, *state, clip_denoised=True)
    x_prev, got = poisoned(x), [s.clone() for s in state]
    unipc_3_step(x, out, i, *got, tab.packed, clip_denoised=True, x_prev=x_prev)
    assert x_prev.dtype == dtype
    torch.testing.assert_close(x_prev.float(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[2], want_c, rtol=2e-2, atol=5e-2)
