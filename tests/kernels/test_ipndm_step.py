"""Fused iPNDM step against its reference (engine.samplers.ipndm_step)."""

import random

import pytest
import torch

from ddpm_engine.kernels.common import advance
from ddpm_engine.kernels.ipndm_step import ipndm_step, reference
from ddpm_engine.samplers import Prediction

from .helpers import PREDICTION_CODE, poisoned, random_case

pytestmark = pytest.mark.usefixtures("seeded")


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("clip", [False, True])
def test_matches_reference(prediction, clip):
    """Mixed step indices (always the first and the last step), a ragged sample size over several
    blocks, every prediction type, clip on and off; x_prev, x0 and the three shifted states checked."""
    tab, x, out, i, _ = random_case(B=6, steps=random.choice([17, 8, 50]))
    state = [torch.randn_like(x) for _ in range(3)]
    want, want_x0, want_eps = reference(tab, x, out, i, *state, prediction=prediction, clip_denoised=clip)
    x_prev, x0, got = poisoned(x), poisoned(x), [s.clone() for s in state]
    ipndm_step(x, out, i, *got, tab.packed, prediction=PREDICTION_CODE[prediction], clip_denoised=clip,
               x_prev=x_prev, x0=x0, block=random.choice([16, 32, 64]))
    torch.testing.assert_close(x_prev, want, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(x0, want_x0, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(got[0], want_eps, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(got[1:], state[:2])  # shifted: eps_prev3 <- eps_prev2 <- eps_prev


def test_the_first_steps_read_no_older_eps():
    """Orders 1, 2, 3 on the first three steps: NaN in the eps they do not use cannot leak in."""
    steps = 9
    tab, x, out, _, _ = random_case(B=2, steps=steps)
    ok, nan = torch.randn_like(x), poisoned(x)
    for k, state in enumerate([(nan, nan, nan), (ok, nan, nan), (ok, ok, nan)]):
        i = torch.full((2,), steps - 1 - k, device=x.device)
        want, _, _ = reference(tab, x, out, i, *state)
        assert torch.isfinite(want).all()
        got, _ = ipndm_step(x, out, i, *(s.clone() for s in state), tab.packed)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=3e-5)


def test_a_short_run_in_place_matches_the_reference_run():
    """Steps in place over a whole run equal the reference run, samples started at different steps."""
    steps = 8
    tab, x, _, _, _ = random_case(B=3, shape=(2, 6, 5), steps=steps)
    i = torch.tensor([steps - 1, steps - 1, steps - 3], device=x.device)
    model = lambda x, i: torch.tanh(1.5 * x) * (1 + 0.1 * i.view(-1, 1, 1, 1))  # noqa: E731
    x_ref, i_ref = x.clone(), i.clone()
    ref_state = [torch.zeros_like(x) for _ in range(3)]
    state = [torch.zeros_like(x) for _ in range(3)]
    for _ in range(steps):
        x_ref, _, eps = reference(tab, x_ref, model(x_ref, i_ref), i_ref, *ref_state)
        ref_state = [eps] + ref_state[:2]
        i_ref = (i_ref - 1).clamp(min=0)
        ipndm_step(x, model(x, i), i, *state, tab.packed, x_prev=x)
        advance(i)
    assert torch.equal(i, i_ref)
    torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_io(dtype):
    """fp16 / bf16 sample and model output (math in fp32; the states stay fp32)."""
    tab, x, out, i, _ = random_case(dtype=dtype)
    state = [torch.randn(x.shape, device=x.device) for _ in range(3)]
    want, _, _ = reference(tab, x.float(), out.float(), i, *state, clip_denoised=True)
    x_prev = poisoned(x)
    ipndm_step(x, out, i, *(s.clone() for s in state), tab.packed, clip_denoised=True, x_prev=x_prev)
    assert x_prev.dtype == dtype
    torch.testing.assert_close(x_prev.float(), want, rtol=2e-2, atol=2e-2)
