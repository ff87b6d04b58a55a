"""kernels.TritonStep against engine.stepping.TorchStep: the engine-facing contract, and its errors."""

import random
import sys

import pytest
import torch

from ddpm_engine.errors import InvalidRequestError, MissingDependencyError
from ddpm_engine.samplers import Prediction, Variance
from ddpm_engine.stepping import Rows, StepSpec, TorchStep
from ddpm_engine.kernels import TritonStep
from ddpm_engine.kernels.ddpm_step import ddpm_step

from .helpers import random_case


def random_spec():
    sampler = random.choice(["ddpm", "ddim"])
    return StepSpec(sampler, random.choice(list(Prediction)), random.choice(list(Variance)),
                    random.choice([False, True]), random.choice([0.0, 1.0, random.uniform(0.05, 0.95)]))


@pytest.mark.parametrize("want_x0", [False, True])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_same_contract_as_torch_step(sampler, want_x0):
    spec = random_spec()
    spec = StepSpec(sampler, spec.prediction, spec.variance, spec.clip_denoised, spec.eta)
    shape = (3, 5, 7)
    tab, x, out, i, words = random_case(B=4, shape=shape)
    i_ref = i.clone()
    ref_rows, rows = Rows(x.clone(), i_ref, words), Rows(x, i, words)
    want_x0_tensor = TorchStep(spec, tab, shape)(ref_rows, out, want_x0=True)
    x_ptr = x.data_ptr()
    x0 = TritonStep(spec, tab, shape)(rows, out, want_x0=want_x0)
    assert rows.x.data_ptr() == x_ptr  # written in place: no allocation per step
    torch.testing.assert_close(rows.x, ref_rows.x, rtol=1e-5, atol=3e-5)
    assert torch.equal(i, i_ref)  # both advanced i -> max(i - 1, 0) on the device
    if want_x0:
        torch.testing.assert_close(x0, want_x0_tensor, rtol=1e-5, atol=3e-5)
    else:
        assert x0 is None


def test_x0_buffer_is_reused_across_steps():
    spec = StepSpec("ddim", Prediction.EPSILON, Variance.FIXED_SMALL, True, 0.0)
    tab, x, out, i, words = random_case(B=2, shape=(1, 4, 4), steps=17)
    step = TritonStep(spec, tab, (1, 4, 4))
    first = step(Rows(x, i, words), out, want_x0=True)
    second = step(Rows(x, i, words), out, want_x0=True)
    assert first.data_ptr() == second.data_ptr()


def test_missing_triton_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    tab, *_ = random_case(B=1, shape=(1, 2, 2))
    spec = StepSpec("ddpm", Prediction.EPSILON, Variance.FIXED_SMALL, False, 0.0)
    with pytest.raises(MissingDependencyError, match="pip install 'triton'"):
        TritonStep(spec, tab, (1, 2, 2))


def test_launcher_rejects_a_non_contiguous_sample():
    tab, x, out, i, words = random_case(B=2, shape=(1, 6, 6))
    with pytest.raises(InvalidRequestError, match="contiguous"):
        ddpm_step(x.transpose(2, 3), out, i, words, tab.packed)
    with pytest.raises(InvalidRequestError, match="int64"):
        ddpm_step(x, out, i.int(), words, tab.packed)
