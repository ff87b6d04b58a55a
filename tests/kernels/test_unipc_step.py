"""Fused UniPC step against its reference (engine.samplers.unipc_step)."""

import random

import pytest
import torch

from ddpm_engine.kernels.common import advance
from ddpm_engine.kernels.unipc_step import reference, unipc_step
from ddpm_engine.samplers import Prediction

from .helpers import PREDICTION_CODE, poisoned, random_case

pytestmark = pytest.mark.usefixtures("seeded")


@pytest.mark.parametrize("prediction", list(Prediction))
def test_matches_reference(prediction):
    """Mixed step indices in one batch (always the first step, steps - 1, and the last, 0), a sample
    size over several blocks with a ragged tail, every prediction type, clip on or off; both states
    and x_prev checked."""
    tab, x, out, i, _ = random_case(B=6, spacing="linspace")
    clip = random.choice([False, True])
    x0_prev, corrector = torch.randn_like(x), torch.randn_like(x)
    want, want_x0, want_corr = reference(tab, x, out, i, x0_prev, corrector, prediction=prediction, clip_denoised=clip)
    x_prev, state, corr = poisoned(x), x0_prev.clone(), corrector.clone()
    _, x0, c = unipc_step(x, out, i, state, corr, tab.packed, prediction=PREDICTION_CODE[prediction],
                          clip_denoised=clip, x_prev=x_prev, block=random.choice([16, 32, 64]))
    assert x0 is state and c is corr  # both states are replaced in place
    torch.testing.assert_close(x_prev, want, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(state, want_x0, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(corr, want_corr, rtol=1e-5, atol=3e-5)


def test_the_first_step_reads_no_state():
    """On a row's first step neither state has a coefficient: NaN there cannot leak in (the kernel
    masks the loads, the reference the products)."""
    steps = 9
    tab, x, out, _, _ = random_case(B=2, steps=steps, spacing="linspace")
    i = torch.full((2,), steps - 1, device=x.device)
    want, _, want_corr = reference(tab, x, out, i, poisoned(x), poisoned(x))
    assert torch.isfinite(want).all() and torch.isfinite(want_corr).all()
    got, _, corr = unipc_step(x, out, i, poisoned(x), poisoned(x), tab.packed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(corr, want_corr, rtol=1e-5, atol=3e-5)


def test_a_short_run_in_place_matches_the_reference_run():
    """Steps in place over a whole run equal the reference run, samples started at different steps."""
    steps = 7
    tab, x, _, _, _ = random_case(B=3, shape=(2, 6, 5), steps=steps, spacing="linspace")
    i = torch.tensor([steps - 1, steps - 1, steps - 3], device=x.device)
    model = lambda x, i: torch.tanh(1.5 * x) * (1 + 0.1 * i.view(-1, 1, 1, 1))  # noqa: E731
    x_ref, i_ref, x0_ref, corr_ref = x.clone(), i.clone(), torch.zeros_like(x), torch.zeros_like(x)
    state, corr = torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(steps):
        x_ref, x0_ref, corr_ref = reference(tab, x_ref, model(x_ref, i_ref), i_ref, x0_ref, corr_ref,
                                            prediction=Prediction.SAMPLE)
        i_ref = (i_ref - 1).clamp(min=0)
        unipc_step(x, model(x, i), i, state, corr, tab.packed, prediction=PREDICTION_CODE[Prediction.SAMPLE], x_prev=x)
        advance(i)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, x0_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_io(dtype):
    """fp16 / bf16 sample and model output (math in fp32; both states stay fp32)."""
    tab, x, out, i, _ = random_case(dtype=dtype, spacing="linspace")
    x0_prev, corrector = torch.randn(x.shape, device=x.device), torch.randn(x.shape, device=x.device)
    want, want_x0, want_corr = reference(tab, x.float(), out.float(), i, x0_prev, corrector, clip_denoised=True)
    x_prev, state, corr = poisoned(x), x0_prev.clone(), corrector.clone()
    unipc_step(x, out, i, state, corr, tab.packed, clip_denoised=True, x_prev=x_prev)
    assert x_prev.dtype == dtype
    torch.testing.assert_close(x_prev.float(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(corr, want_corr, rtol=2e-2, atol=5e-2)
