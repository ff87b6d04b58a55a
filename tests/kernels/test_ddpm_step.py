"""Fused DDPM step against its reference (engine.samplers.ddpm_step) with the engine's noise."""

import random

import pytest
import torch

from ddpm_engine.errors import InvalidRequestError
from ddpm_engine.kernels.common import advance
from ddpm_engine.kernels.ddpm_step import ddpm_step, reference
from ddpm_engine.samplers import Prediction, Variance

from .helpers import PREDICTION_CODE, poisoned, random_case, reference_noise, with_variance_part

pytestmark = pytest.mark.usefixtures("seeded")


@pytest.mark.parametrize("prediction", list(Prediction))
@pytest.mark.parametrize("variance", list(Variance))
@pytest.mark.parametrize("clip", [False, True])
def test_matches_reference(prediction, variance, clip):
    """Every setting; a learned variance reads the second half of a 2C-channel output in place."""
    tab, x, out, i, words = random_case()
    out = with_variance_part(out, variance)
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


@pytest.mark.parametrize("variance", [Variance.LEARNED, Variance.LEARNED_RANGE])
def test_learned_variance_is_per_element_and_masked_at_the_last_step(variance):
    """The variance part sets each element's noise scale (two outputs that differ only there give
    other x_prev, the same x0); at i = 0 a variance part that overflows (inf, NaN) leaks nothing."""
    tab, x, out, _, words = random_case(B=4, shape=(2, 5, 3))
    i = torch.tensor([0, 1, 2, 3], device=x.device)  # near t = 0, where beta_t and beta~_t differ most
    wide = with_variance_part(out, variance)
    other = wide.clone()
    other[:, 2:] = with_variance_part(out, variance)[:, 2:]
    a, a0 = ddpm_step(x, wide, i, words, tab.packed, variance=variance)
    b, b0 = ddpm_step(x, other, i, words, tab.packed, variance=variance)
    assert torch.equal(a0, b0) and torch.equal(a[i == 0], b[i == 0])
    assert (a[i != 0] - b[i != 0]).abs().max() > 1e-4
    huge = wide.clone()
    huge[:, 2:] = float("inf") if variance is Variance.LEARNED else 1e4
    huge[0, 2] = float("nan")
    at_zero = torch.zeros_like(i)
    got, _ = ddpm_step(x, huge, at_zero, words, tab.packed, variance=variance)
    mean, _ = reference(tab, x, out, at_zero, torch.zeros_like(x))
    torch.testing.assert_close(got, mean, rtol=1e-5, atol=2e-5)


def test_learned_range_half_precision_io():
    tab, x, out, i, words = random_case(dtype=torch.bfloat16)
    out = with_variance_part(out, Variance.LEARNED_RANGE)
    want, _ = reference(tab, x.float(), out.float(), i, reference_noise(words, i, x), variance=Variance.LEARNED_RANGE)
    x_prev = poisoned(x)
    ddpm_step(x, out, i, words, tab.packed, variance="learned_range", x_prev=x_prev, store_x0=False)
    torch.testing.assert_close(x_prev.float(), want, rtol=2e-2, atol=2e-2)


def test_an_output_whose_width_does_not_fit_the_variance_type_is_refused():
    """A learned variance needs [prediction, variance part] (2C channels), a fixed one C: the error
    names the shapes and the variance type, before anything is launched."""
    tab, x, out, i, words = random_case(B=2, shape=(3, 4, 4))
    x_prev = poisoned(x)
    with pytest.raises(InvalidRequestError, match=r"\(2, 6, 4, 4\) for variance type 'learned_range'"):
        ddpm_step(x, out, i, words, tab.packed, variance="learned_range", x_prev=x_prev)
    with pytest.raises(InvalidRequestError, match=r"\(2, 3, 4, 4\) for variance type 'fixed_small'"):
        ddpm_step(x, torch.cat([out, out], 1), i, words, tab.packed, x_prev=x_prev)
    assert torch.isnan(x_prev).all()
