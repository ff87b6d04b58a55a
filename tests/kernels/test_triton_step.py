"""kernels.TritonStep against engine.stepping.TorchStep: the engine-facing contract, and its errors."""

import random
import sys

import pytest
import torch

from ddpm_engine.errors import BackendUnavailableError, InvalidRequestError, MissingDependencyError
from ddpm_engine.kernels import TritonStep
from ddpm_engine.kernels.ddpm_step import ddpm_step
from ddpm_engine.samplers import (ROW_STATE, SAMPLER_DEFS, SAMPLERS, Prediction, Variance, sampler_def,
                                  timestep_spacing)
from ddpm_engine.stepping import Rows, StepSpec, TorchStep

from .helpers import random_case, with_variance_part

pytestmark = pytest.mark.usefixtures("seeded")
STATE_FIELDS = sorted({name for names in ROW_STATE.values() for name in names})  # every Rows state field


def random_spec(sampler):
    return StepSpec(sampler, random.choice(list(Prediction)), random.choice(list(Variance)),
                    random.choice([False, True]), random.choice([0.0, 1.0, random.uniform(0.05, 0.95)]),
                    use_clipped_model_output=random.choice([False, True]))


@pytest.mark.parametrize("want_x0", [False, True])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_contract_as_torch_step(sampler, want_x0):
    spec = random_spec(sampler)
    shape = (3, 5, 7)
    tab, x, out, i, words = random_case(B=4, shape=shape, spacing=timestep_spacing(sampler))
    out = with_variance_part(2 * out, spec.variance)  # x0 often beyond [-1, 1]: the clip options matter
    state = {name: torch.randn_like(x) for name in STATE_FIELDS}  # state left by a previous step
    i_ref = i.clone()
    ref_rows = Rows(x.clone(), i_ref, words, **{name: v.clone() for name, v in state.items()})
    rows = Rows(x, i, words, **state)
    want_x0_tensor = TorchStep(spec, tab, shape)(ref_rows, out, want_x0=True)
    x_ptr = x.data_ptr()
    x0 = TritonStep(spec, tab, shape)(rows, out, want_x0=want_x0)
    assert rows.x.data_ptr() == x_ptr  # written in place: no allocation per step
    torch.testing.assert_close(rows.x, ref_rows.x, rtol=1e-5, atol=3e-5)
    for name in STATE_FIELDS:  # each untouched unless the sampler keeps it
        torch.testing.assert_close(getattr(rows, name), getattr(ref_rows, name), rtol=1e-5, atol=3e-5, msg=name)
    assert torch.equal(i, i_ref)  # both advanced i -> max(i - 1, 0) on the device
    if want_x0:
        torch.testing.assert_close(x0, want_x0_tensor, rtol=1e-5, atol=3e-5)
    else:
        assert x0 is None


@pytest.mark.parametrize("sampler", sorted(ROW_STATE))
def test_multistep_runs_agree_and_a_seed_does_not_depend_on_its_batch(sampler):
    """Whole multistep runs (every sampler with state: DPM-Solver++(2M, 3M), its SDE, UniPC-2/3, iPNDM) through both steps, with a row joining
    two steps late and the others leaving when done (as the continuous server does): each row ends
    as in its run alone."""
    steps, shape = 6, (1, 4, 6)
    spec = StepSpec(sampler, Prediction.EPSILON, Variance.FIXED_SMALL, True, 0.0)
    tab, x, _, _, words = random_case(B=3, shape=shape, steps=steps, spacing="linspace")
    i = torch.full((3,), steps - 1, device=x.device)
    model = lambda x: 0.7 * torch.sin(2 * x) + 0.2 * x  # noqa: E731

    def rows_of(b0, b1):
        state = {name: torch.zeros_like(x[b0:b1]) for name in ROW_STATE[sampler]}
        return Rows(x[b0:b1].clone(), i[b0:b1].clone(), words[b0:b1], **state)

    alone = []
    for b in range(3):
        rows, step = rows_of(b, b + 1), TorchStep(spec, tab, shape)
        for _ in range(steps):
            step(rows, model(rows.x))
        alone.append(rows.x)
    alone = torch.cat(alone)
    for impl in (TorchStep, TritonStep):
        rows, step = rows_of(0, 2), impl(spec, tab, shape)
        for k in range(steps + 2):
            if k == 2:
                rows = Rows.cat([rows, rows_of(2, 3)])
            step(rows, model(rows.x))
            if k == steps - 1:  # rows 0 and 1 are done and leave the batch
                first_two = rows.x[:2].clone()
                rows = rows.part(2, 3)
        got = torch.cat([first_two, rows.x])
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5, msg=impl.__name__)


def test_multistep_rows_need_their_state():
    tab, x, out, i, words = random_case(B=2, shape=(1, 4, 4), steps=10, spacing="linspace")
    for sampler, rows, missing in [("dpmpp_2m", Rows(x, i, words), "x0_prev"),
                                   ("dpmpp_2m_sde", Rows(x, i, words), "x0_prev"),
                                   ("unipc", Rows(x, i, words, torch.zeros_like(x)), "corrector")]:
        spec = StepSpec(sampler, Prediction.EPSILON, Variance.FIXED_SMALL, False, 0.0)
        for impl in (TorchStep, TritonStep):
            with pytest.raises(InvalidRequestError, match=missing):
                impl(spec, tab, (1, 4, 4))(rows, out)


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


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_each_entry_names_a_kernel_held_to_its_reference(sampler):
    """The registry's kernel name resolves to a step function in ddpm_engine.kernels, in a module
    whose ``reference`` (the specification its tests hold it to) is the entry's reference step."""
    import importlib

    entry = sampler_def(sampler)
    module_name, function = entry.kernel.split(":")
    module = importlib.import_module(f"ddpm_engine.kernels.{module_name}")
    assert callable(getattr(module, function))
    assert entry.reference in (getattr(module, "reference", None), getattr(module, "reference_sde", None))


def test_a_sampler_without_a_kernel_is_refused_with_the_way_out(monkeypatch):
    import dataclasses

    entry = dataclasses.replace(sampler_def("ddim"), name="ddim_eager_only", kernel=None)
    monkeypatch.setitem(SAMPLER_DEFS, entry.name, entry)
    tab, *_ = random_case(B=1, shape=(1, 2, 2))
    spec = StepSpec(entry.name, Prediction.EPSILON, Variance.FIXED_SMALL, False, 0.0)
    with pytest.raises(BackendUnavailableError, match="no fused Triton step; use step_impl='torch'"):
        TritonStep(spec, tab, (1, 2, 2))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_kernel_reads_a_2c_output_in_place(sampler):
    """A model with a learned variance outputs [prediction, variance part] (2C channels, here with
    an odd C and a sample size that is not a multiple of the block). Every kernel reads the
    prediction through the output's per-sample stride, in place (the parts are views of the
    output); a sampler other than DDPM never reads the variance part, so NaN there leaks nothing.
    Both steps give the torch step's result on the first C channels."""
    from ddpm_engine.kernels.common import output_parts

    variance = random.choice([Variance.LEARNED, Variance.LEARNED_RANGE])
    spec = StepSpec(sampler, random.choice(list(Prediction)), variance, random.choice([False, True]), 1.0)
    shape = (3, 5, 7)
    tab, x, out, i, words = random_case(B=3, shape=shape, spacing=timestep_spacing(sampler))
    wide = with_variance_part(out, variance)
    if sampler != "ddpm":
        wide[:, 3:] = float("nan")
    prediction, variance_part, stride, _, guided = output_parts(wide, x, variance)
    assert not guided
    assert prediction.data_ptr() == wide.data_ptr() and stride == 2 * x[0].numel()
    assert variance_part.data_ptr() == wide.data_ptr() + x[0].numel() * wide.element_size()
    state = {name: torch.randn_like(x) for name in ROW_STATE.get(sampler, ())}
    x_before, i_before, state_before = x.clone(), i.clone(), {k: v.clone() for k, v in state.items()}
    ref = Rows(x.clone(), i.clone(), words, **{k: v.clone() for k, v in state.items()})
    rows = Rows(x, i, words, **state)
    want_x0 = TorchStep(spec, tab, shape)(ref, wide, want_x0=True)
    got_x0 = TritonStep(spec, tab, shape)(rows, wide, want_x0=True)
    assert torch.isfinite(rows.x).all()
    torch.testing.assert_close(rows.x, ref.x, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(got_x0, want_x0, rtol=1e-5, atol=3e-5)
    if sampler != "ddpm":  # the same step as the prediction alone (C channels) with a fixed variance
        fixed = StepSpec(sampler, spec.prediction, Variance.FIXED_SMALL, spec.clip_denoised, spec.eta)
        alone = Rows(x_before.clone(), i_before.clone(), words, **state_before)
        TorchStep(fixed, tab, shape)(alone, out)
        torch.testing.assert_close(rows.x, alone.x, rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize("impl", [TorchStep, TritonStep])
def test_an_output_too_narrow_or_too_wide_for_the_variance_type_is_refused_before_the_step(impl):
    tab, x, out, i, words = random_case(B=2, shape=(1, 4, 4), steps=10)
    for sampler, variance, width in [("ddim", Variance.LEARNED_RANGE, 1), ("ddim", Variance.FIXED_SMALL, 2),
                                     ("ddpm", Variance.LEARNED, 1), ("ddpm", Variance.FIXED_LARGE, 2)]:
        spec = StepSpec(sampler, Prediction.EPSILON, variance, False, 0.0)
        rows = Rows(x.clone(), i.clone(), words)
        with pytest.raises(InvalidRequestError, match=f"variance type '{variance.value}'"):
            impl(spec, tab, (1, 4, 4))(rows, out.repeat(1, width, 1, 1))
        assert torch.equal(rows.x, x) and torch.equal(rows.i, i)
