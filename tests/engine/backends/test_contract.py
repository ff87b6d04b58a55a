"""The backend contract (``backends.base.Backend``), checked on every registered backend that can
run here: availability answers, parity with eager torch per call and over whole sampling chains,
the one input check, precision refusals, name / repr / flags, and reuse of the cached artifact.
A backend that cannot run here is skipped with its reason. Each backend's own test file checks
only what is special to it.

Random inputs come from the test's seed (tests/conftest.py), which a failing test prints;
``TEST_SEED=N`` reproduces them."""

import os
import random
import subprocess
import sys

import pytest
import torch

from ddpm_engine import Engine, backends
from ddpm_engine.backends import BACKEND_CLASSES, BACKENDS, PRECISIONS, Backend, backend_class
from ddpm_engine.backends.base import quantized_refusal
from ddpm_engine.errors import BackendUnavailableError, InvalidRequestError

from .helpers import SHAPE, max_rel_err, small_model

# per backend: the largest max|out - eager| / max|eager| of one fp32 call (its graph or compiled
# code may order sums differently from eager torch), and the largest max abs difference of the
# images of a 10-step chain
TOLERANCE = {
    "torch": (1e-5, 1e-4),
    "onnxruntime": (1e-5, 1e-4),
    "openvino": (1e-5, 1e-4),
    "aoti": (1e-5, 1e-4),
    "tensorrt": (1e-5, 1e-4),
}
# per backend: (owns_cpu_threads on the CPU, graph_capturable)
FLAGS = {
    "torch": (False, True),
    "onnxruntime": (True, False),
    "openvino": (True, False),
    "aoti": (False, True),
    "tensorrt": (False, True),
}
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
SLOW_TO_BUILD = {"aoti"}  # an AOTInductor compile takes tens of CPU seconds
BUILT = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TO_BUILD else n for n in BACKEND_CLASSES]


def device_for(name: str) -> str:
    """The first of cpu, cuda where ``name`` can run at fp32; skips the test with the reasons if none."""
    reasons = {}
    for device in ("cpu", "cuda"):
        reasons[device] = backends.available(device, "fp32", [name])[name]
        if reasons[device] is None:
            return device
    pytest.skip(f"{name} cannot run here: " + "; ".join(f"{d}: {why}" for d, why in reasons.items()))


@pytest.fixture(scope="module")
def loaded():
    return small_model()


@pytest.fixture(scope="module", params=BUILT)
def built(request, cache, loaded):
    """(name, the backend built through backends.create at fp32 on the device it runs on)."""
    name = request.param
    return name, backends.create(name, loaded, device_for(name), "fp32")


def test_every_backend_is_in_these_tables():
    assert set(TOLERANCE) == set(FLAGS) == set(BACKEND_CLASSES) and BACKENDS == ("auto", *BACKEND_CLASSES)


@pytest.mark.parametrize("name", BACKEND_CLASSES)
def test_the_registry_line_names_a_backend_class(name):
    cls = backend_class(name)
    assert issubclass(cls, Backend) and cls.name == name
    assert {"create", "run"} <= set(vars(cls)), "a backend implements create and run (base.Backend)"
    assert cls.graph_capturable == FLAGS[name][1]


@pytest.mark.parametrize("name", BACKEND_CLASSES)
def test_availability_answers_none_or_a_reason(name):
    cls = backend_class(name)
    for device in ("cpu", "cuda", "meta"):
        for precision in PRECISIONS:
            reason = quantized_refusal(cls, precision) or cls.unavailable_reason(torch.device(device), precision)
            assert reason is None or (isinstance(reason, str) and reason.strip()), (device, precision, reason)
            assert backends.available(device, precision, [name]) == {name: reason}


def test_asking_about_some_backends_imports_no_other_runtime():
    """backend="auto" asks about its CPU candidates only: aoti's check (it imports torch._inductor,
    seconds) and tensorrt's must not run."""
    code = ("import sys; from ddpm_engine.backends import auto, available; "
            "available('cpu', 'fp32', auto.CPU_CANDIDATES); "
            "print(sorted(m for m in sys.modules if m.startswith(('torch._inductor', 'tensorrt', "
            "'ddpm_engine.backends.aoti', 'ddpm_engine.backends.tensorrt'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}).stdout.strip()
    assert out == "[]"


def test_each_call_matches_eager(built, loaded, seeded):
    name, backend = built
    tol = TOLERANCE[name][0]
    for batch in (1, 3, 2):
        x = torch.randn(batch, *SHAPE)
        t = torch.randint(0, loaded.scheduler.num_train_timesteps, (batch,))
        x_in, t_in = x.clone(), t.clone()
        with torch.inference_mode():
            want = loaded.module(x, t)
        got = backend(x.to(backend.device), t.to(backend.device))
        assert got.dtype == torch.float32 and got.shape == x.shape and got.is_contiguous()
        assert got.device.type == backend.device.type
        err = max_rel_err(got.cpu(), want)
        assert err <= tol, f"{name} at batch {batch}: {err:.2e} > {tol:.0e} (seed {seeded})"
        assert torch.equal(x, x_in) and torch.equal(t, t_in), f"{name} changed its inputs"
        kept = got.clone()
        backend(torch.randn_like(x).to(backend.device), t.to(backend.device))
        assert torch.equal(got, kept), f"{name}'s next call overwrote the output of the one before"


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_a_sampling_chain_matches_the_torch_backend(built, loaded, sampler, seeded):
    name, backend = built
    seeds = [random.getrandbits(64) for _ in range(3)]
    device = backend.device.type
    got = Engine(loaded, backend=name, device=device).sample(seeds, sampler=sampler, steps=10)
    want = Engine(loaded, backend="torch", device=device).sample(seeds, sampler=sampler, steps=10)
    err = float((got - want).abs().max())
    assert err <= TOLERANCE[name][1], f"{name} {sampler}-10: {err:.2e} (seed {seeded}, seeds {seeds})"


def bad_inputs(backend):
    """(what is wrong, x, t) for each refusal the one input check makes."""
    x, t = torch.randn(2, *SHAPE), torch.zeros(2, dtype=torch.int64)
    cases = [
        ("another sample shape", torch.randn(2, 1, 4, 4), t),
        ("another channel count", torch.randn(2, 3, *SHAPE[1:]), t),
        ("no batch axis", torch.randn(*SHAPE), t[:1]),
        ("t of another batch", x, torch.zeros(3, dtype=torch.int64)),
        ("t of two axes", x, torch.zeros(2, 1, dtype=torch.int64)),
        ("integer x", x.to(torch.int64), t),
        ("floating t", x, t.float()),
        ("boolean t", x, t.bool()),
        ("x not a tensor", x.numpy(), t),
    ]
    if backend.batches is not None:
        lo, hi = backend.batches
        cases.append(("too large a batch", torch.empty(hi + 1, *SHAPE), torch.zeros(hi + 1, dtype=torch.int64)))
        if lo > 1:
            cases.append(("too small a batch", torch.empty(lo - 1, *SHAPE), torch.zeros(lo - 1, dtype=torch.int64)))
    return cases


def test_bad_inputs_are_refused_with_a_typed_error(built):
    name, backend = built
    for what, x, t in bad_inputs(backend):
        with pytest.raises(InvalidRequestError, match="expected x|takes batches"):
            backend(x, t)
            pytest.fail(f"{name} took {what}")


@pytest.mark.parametrize("name", BACKEND_CLASSES)
def test_a_precision_it_cannot_run_is_refused_with_its_reason(name, loaded, cache):
    device = device_for(name)
    with pytest.raises(InvalidRequestError, match="unknown precision"):
        backends.create(name, loaded, device, "fp64")
    refused = {p: backends.available(device, p, [name])[name] for p in PRECISIONS}
    assert refused["fp32"] is None
    for precision, reason in refused.items():
        if reason is not None:
            with pytest.raises(BackendUnavailableError) as exc:
                backends.create(name, loaded, device, precision)
            assert reason in str(exc.value) and name in str(exc.value)


def test_name_repr_and_flags(built):
    name, backend = built
    owns_threads, capturable = FLAGS[name]
    assert backend.name == name and backend.precision == "fp32" and backend.dtype == torch.float32
    assert backend.sample_shape == SHAPE
    text = repr(backend)
    assert text.startswith(type(backend).__name__) and "precision=fp32" in text
    assert backend.owns_cpu_threads == (owns_threads and backend.device.type == "cpu")
    assert backend.graph_capturable == capturable
    if capturable:
        backend.check_graph_capturable()
    else:
        with pytest.raises(BackendUnavailableError, match="CUDA graph") as exc:
            backend.check_graph_capturable()
        assert backend.graph_capture_refusal in str(exc.value)


def test_the_cached_artifact_is_reused(built, loaded, cache):
    name, backend = built
    if backend.path is None:
        pytest.skip(f"{name} runs no cached artifact")
    assert cache in backend.path.parents and backend.path.is_file()
    mtime = backend.path.stat().st_mtime_ns
    again = backends.create(name, loaded, backend.device, "fp32")
    assert again.path == backend.path and backend.path.stat().st_mtime_ns == mtime
    assert [p.name for p in backend.path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary files
    x, t = torch.randn(2, *SHAPE), torch.randint(0, 1000, (2,))
    torch.testing.assert_close(again(x.to(again.device), t.to(again.device)),
                               backend(x.to(backend.device), t.to(backend.device)))


def test_versions_reads_the_installed_distributions(monkeypatch):
    import importlib.metadata as md

    from ddpm_engine.backends.base import versions

    assert versions(("torch", "surely-not-a-package")) == {"torch": md.version("torch"),
                                                           "surely-not-a-package": None}
    installed = {"onnxruntime-gpu": "9.9.9"}  # only the GPU build of onnxruntime

    def version(dist):
        if dist not in installed:
            raise md.PackageNotFoundError(dist)
        return installed[dist]

    monkeypatch.setattr(md, "version", version)
    assert versions(("onnxruntime", "openvino")) == {"onnxruntime": "9.9.9", "openvino": None}
