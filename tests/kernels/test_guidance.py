"""Classifier-free guidance fused into the step kernels, against the torch reference.

A guided model call outputs 2B rows for the B rows stepped: the conditional rows, then the
unconditional ones (engine.guidance.guided). Every kernel combines row b and row b + B as it
loads the output (kernels/common.py::load_output): uncond + s * (cond - uncond), on the
prediction's C channels only; a learned variance is the conditional row's.
"""

import random

import pytest
import torch

from ddpm_engine.errors import InvalidRequestError
from ddpm_engine.kernels import TritonStep
from ddpm_engine.kernels.common import output_parts
from ddpm_engine.samplers import ROW_STATE, SAMPLERS, Prediction, Variance, timestep_spacing
from ddpm_engine.stepping import Rows, StepSpec, TorchStep

from .helpers import random_case, with_variance_part

pytestmark = pytest.mark.usefixtures("seeded")
SHAPE = (3, 5, 7)  # an odd C, a sample size that is not a multiple of the block


def guided_case(sampler, variance, B=4, dtype=torch.float32):
    """A step's inputs with a guided call's output: [2B, C or 2C, ...], both halves random."""
    tab, x, cond, i, words = random_case(B=B, shape=SHAPE, spacing=timestep_spacing(sampler), dtype=dtype)
    uncond = torch.randn_like(cond.float()).to(dtype)
    both = torch.cat([with_variance_part(2 * cond, variance), with_variance_part(2 * uncond, variance)])
    state = {name: torch.randn_like(x.float()) for name in ROW_STATE.get(sampler, ())}  # left by a previous step
    return tab, x, both, i, words, state


def spelled_out(output, scale, C):
    """The guided output written from the formula (Ho & Salimans 2022, eq. 6), not from guidance.guided."""
    B = output.shape[0] // 2
    cond, uncond = output[:B].double(), output[B:].double()
    pred = uncond[:, :C] + scale * (cond[:, :C] - uncond[:, :C])
    return torch.cat([pred, cond[:, C:]], 1).to(output.dtype)


def rows_of(x, i, words, state):
    return Rows(x.clone(), i.clone(), words, **{k: v.clone() for k, v in state.items()})


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_kernel_guides_as_the_reference(sampler):
    """Each sampler's kernel with guidance on (a random scale, including 0 and above 1, a random
    prediction type, variance type and clipping) gives the torch step's rows, state and x0; the
    torch step itself is the unguided step on the spelled-out combination."""
    variance = Variance.LEARNED_RANGE if sampler == "ddpm" and random.random() < 0.5 else random.choice(list(Variance))
    spec = StepSpec(sampler, random.choice(list(Prediction)), variance, random.choice([False, True]),
                    random.choice([0.0, 1.0, random.uniform(0.05, 0.95)]))
    scale = random.choice([0.0, random.uniform(1.5, 4.0), random.uniform(0.1, 0.9)])
    tab, x, both, i, words, state = guided_case(sampler, variance)
    ref, plain, rows = rows_of(x, i, words, state), rows_of(x, i, words, state), rows_of(x, i, words, state)
    want_x0 = TorchStep(spec, tab, SHAPE, guidance_scale=scale)(ref, both, want_x0=True)
    TorchStep(spec, tab, SHAPE)(plain, spelled_out(both, scale, SHAPE[0]))
    torch.testing.assert_close(ref.x, plain.x, rtol=1e-5, atol=3e-5)
    x_ptr = rows.x.data_ptr()
    got_x0 = TritonStep(spec, tab, SHAPE, guidance_scale=scale)(rows, both, want_x0=True)
    assert rows.x.data_ptr() == x_ptr  # in place
    torch.testing.assert_close(rows.x, ref.x, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(got_x0, want_x0, rtol=1e-5, atol=3e-5)
    for name in state:
        torch.testing.assert_close(getattr(rows, name), getattr(ref, name), rtol=1e-5, atol=3e-5, msg=name)
    assert torch.equal(rows.i, ref.i)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_half_precision_io_with_guidance(sampler, dtype):
    """fp16 / bf16 x and model output (math in fp32 inside the kernel), against the fp32 reference."""
    spec = StepSpec(sampler, Prediction.EPSILON, Variance.FIXED_SMALL, True, 0.5)
    tab, x, both, i, words, state = guided_case(sampler, Variance.FIXED_SMALL, dtype=dtype)
    ref = Rows(x.float(), i.clone(), words, **{k: v.clone() for k, v in state.items()})
    TorchStep(spec, tab, SHAPE, guidance_scale=3.0)(ref, both.float())
    rows = rows_of(x, i, words, state)
    TritonStep(spec, tab, SHAPE, guidance_scale=3.0)(rows, both)
    assert rows.x.dtype == dtype
    torch.testing.assert_close(rows.x.float(), ref.x, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("variance", [Variance.LEARNED, Variance.LEARNED_RANGE])
def test_a_learned_variance_is_the_conditional_rows_and_the_unconditional_one_is_never_read(variance):
    """DDPM with a learned variance and guidance: the prediction is guided, the log-variance is the
    conditional row's; NaN in the unconditional rows' variance part leaks nothing (never read)."""
    spec = StepSpec("ddpm", random.choice(list(Prediction)), variance, random.choice([False, True]), 0.0)
    tab, x, both, i, words, _ = guided_case("ddpm", variance)
    B, C = x.shape[0], SHAPE[0]
    want = rows_of(x, i, words, {})
    TorchStep(spec, tab, SHAPE)(want, spelled_out(both, 4.0, C))
    both[B:, C:] = float("nan")
    for impl in (TorchStep, TritonStep):
        rows = rows_of(x, i, words, {})
        impl(spec, tab, SHAPE, guidance_scale=4.0)(rows, both)
        assert torch.isfinite(rows.x).all(), impl.__name__
        torch.testing.assert_close(rows.x, want.x, rtol=1e-5, atol=3e-5, msg=impl.__name__)


def test_scale_one_reads_no_second_half_and_compiles_no_guidance():
    """Without guidance the output has B rows and the kernel is the unguided one (GUIDED false);
    with guidance the views start at the conditional rows, the unconditional ones B rows further."""
    tab, x, out, i, words = random_case(B=3, shape=SHAPE)
    *_, scale, guided = output_parts(out, x)
    assert (scale, guided) == (1.0, False)
    both = torch.cat([out, out])
    prediction, _, stride, scale, guided = output_parts(both, x, None, 2.5)
    assert (scale, guided) == (2.5, True) and prediction.data_ptr() == both.data_ptr() and stride == x[0].numel()


@pytest.mark.parametrize("impl", [TorchStep, TritonStep])
def test_an_output_with_other_than_2b_rows_is_refused_under_guidance(impl):
    tab, x, out, i, words = random_case(B=2, shape=(1, 4, 4), steps=10)
    spec = StepSpec("ddim", Prediction.EPSILON, Variance.FIXED_SMALL, False, 0.0)
    for output, scale in [(out, 2.0), (torch.cat([out, out, out]), 2.0), (torch.cat([out, out]), 1.0)]:
        rows = Rows(x.clone(), i.clone(), words)
        with pytest.raises(InvalidRequestError, match="rows|shape"):
            impl(spec, tab, (1, 4, 4), guidance_scale=scale)(rows, output)
        assert torch.equal(rows.x, x) and torch.equal(rows.i, i)
