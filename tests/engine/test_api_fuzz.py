"""Property-based fuzz of the public API (hypothesis): every combination of good and bad
arguments to ``Engine.from_pretrained``, ``sample``, ``submit`` and the CLI either works (images
of the right shape, finite, in [-1, 1]) or raises an ``EngineError`` whose message says what to
do. Nothing else is raised, nothing hangs, and the engine gives the same images afterwards."""

import math

import numpy as np

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ddpm_engine import Engine, EngineError
from ddpm_engine.__main__ import main
from ddpm_engine.models import DoubleConvUNet
from ddpm_engine.samplers import SAMPLERS

SHAPE = (1, 4, 4)
T = 40  # a short schedule keeps DDPM's default (T steps) fast
HINTS = ("use ", "choose", "must", "expected", "at most", "split", "set ", "install", "retry", "pass ",
         "outside", "got", "cannot", "not supported", "needs")
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Engine.from_module(DoubleConvUNet(1, (4, 8)).eval(), scheduler={"num_train_timesteps": T},
                              sample_shape=SHAPE, backend="torch")


@pytest.fixture(scope="module")
def reference(engine):
    return engine.sample([1, 2], sampler="ddim", steps=4)


def says_what_to_do(exc: Exception) -> bool:
    event(type(exc).__name__)
    message = str(exc).lower()
    return len(message) > 15 and any(h in message for h in HINTS)


def anything():
    return st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=5),
                     st.lists(st.integers(-2, 3), max_size=3))


def mostly(good, bad):
    """Good values about four times in five, so that working calls are fuzzed too."""
    return st.one_of(good, good, good, good, bad)


batches = mostly(st.one_of(st.integers(1, 3), st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=3)),
                 st.one_of(st.integers(-2, 0), st.just(10**12), st.lists(st.integers(-1, 2**64), max_size=4),
                           st.just([]), st.just(True), st.just("3"), st.just(2.5), st.just([1.5]),
                           st.just(torch.tensor(3)), st.just(np.array([[1, 2]])), st.just(torch.tensor([1.5]))))
samplers = mostly(st.sampled_from(SAMPLERS), st.one_of(st.just("euler"), anything()))
steps = mostly(st.one_of(st.none(), st.integers(1, 6)),
               st.one_of(st.integers(-1, 0), st.just(T + 1), st.just(2.0), st.just("4"), st.just(True)))
etas = mostly(st.floats(0.0, 1.0), st.one_of(st.floats(allow_nan=True, allow_infinity=True), anything()))
flags = mostly(st.one_of(st.none(), st.booleans()), anything())
intermediates = mostly(st.one_of(st.booleans(), st.none(), st.lists(st.integers(0, T - 1), max_size=3)),
                       st.one_of(st.lists(st.integers(-5, T + 5), max_size=3), st.just("x")))
x_Ts = mostly(st.sampled_from(["none", "good"]), st.sampled_from(["shape", "nan", "list"]))
drivers = mostly(st.just("eager"), st.one_of(st.sampled_from(["python", "c", "graph_loop"]), anything()))


def make_x_T(kind, n):
    n = n if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 10 else 1
    return {"none": None, "good": torch.randn(n, *SHAPE), "shape": torch.randn(n, 2, 4, 4),
            "nan": torch.full((n, *SHAPE), math.nan), "list": [[0.0]]}[kind]


def check_images(images, n=None, shape=SHAPE):
    event("images")
    assert isinstance(images, torch.Tensor) and images.dtype == torch.float32
    assert images.shape[1:] == shape and (n is None or images.shape[0] == n)
    assert torch.isfinite(images).all() and images.abs().max() <= 1.0


@FUZZ
@given(batch=batches, sampler=samplers, steps=steps, eta=etas, clip=flags, clipped_eps=flags,
       inter=intermediates, x_T=x_Ts, driver=drivers)
def test_sample(engine, reference, batch, sampler, steps, eta, clip, clipped_eps, inter, x_T, driver):
    n = len(batch) if isinstance(batch, list) else batch
    try:
        out = engine.sample(batch, sampler=sampler, steps=steps, eta=eta, clip_denoised=clip,
                            use_clipped_model_output=clipped_eps, x_T=make_x_T(x_T, n),
                            return_intermediates=inter, driver=driver)
    except EngineError as exc:
        assert says_what_to_do(exc), repr(exc)
    else:
        images = out[0] if isinstance(out, tuple) else out
        check_images(images, n if isinstance(n, int) and not isinstance(n, bool) else None)
    assert torch.equal(engine.sample([1, 2], sampler="ddim", steps=4), reference)


@FUZZ
@given(seeds=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=3), sampler=st.sampled_from(SAMPLERS),
       steps=st.one_of(st.none(), st.integers(1, 6)), eta=st.floats(0.0, 1.0), clip=st.sampled_from([None, True, False]),
       clipped_eps=st.sampled_from([None, True, False]), inter=st.one_of(st.booleans(), st.lists(st.integers(0, T - 1))),
       with_x_T=st.booleans())
def test_good_requests_give_images(engine, seeds, sampler, steps, eta, clip, clipped_eps, inter, with_x_T):
    """Valid requests always return images: no valid combination of options is refused."""
    out = engine.sample(seeds, sampler=sampler, steps=steps, eta=eta, clip_denoised=clip,
                        use_clipped_model_output=clipped_eps, return_intermediates=inter,
                        x_T=make_x_T("good", len(seeds)) if with_x_T else None)
    check_images(out[0] if isinstance(out, tuple) else out, len(seeds))


@FUZZ
@given(batch=batches, sampler=samplers, steps=steps, eta=etas,
       timeout=mostly(st.none(), st.one_of(st.floats(1e-9, 1e-3), anything())))
def test_submit(engine, reference, batch, sampler, steps, eta, timeout):
    try:
        future = engine.submit(batch, sampler=sampler, steps=steps, eta=eta, timeout=timeout)
    except EngineError as exc:
        assert says_what_to_do(exc), repr(exc)
    else:
        try:
            check_images(future.result(timeout=60))
        except EngineError as exc:  # a tiny timeout may expire: RequestTimeoutError says so
            assert says_what_to_do(exc), repr(exc)
    assert torch.equal(engine.sample([1, 2], sampler="ddim", steps=4), reference)


_engines = {}


@settings(max_examples=25, deadline=None)
@given(backend=st.one_of(st.sampled_from(["torch", "auto", "onnxruntime", "tensorrt", "aoti"]), anything()),
       device=st.one_of(st.sampled_from(["cpu", "cuda", "tpu", "cuda:7"]), anything()),
       precision=st.one_of(st.sampled_from(["fp32", "fp16", "bf16", "fp8"]), anything()),
       step_impl=st.one_of(st.sampled_from(["auto", "torch", "triton", "cuda"]), anything()),
       batching=st.one_of(st.booleans(), anything()))
def test_from_pretrained(backend, device, precision, step_impl, batching):
    if backend == "aoti" and device in ("cpu", None) and precision == "fp32":
        backend = "torch"  # an AOTInductor compile takes ~30 s here; its own tests cover it
    key = (repr(backend), repr(device), repr(precision), repr(step_impl), repr(batching))
    try:
        eng = _engines.get(key) or Engine.from_pretrained("digits", backend=backend, device=device,
                                                          precision=precision, step_impl=step_impl, batching=batching)
    except EngineError as exc:
        assert says_what_to_do(exc), repr(exc)
        return
    _engines[key] = eng
    check_images(eng.sample([3], sampler="ddim", steps=2), 1, eng.sample_shape)


@settings(max_examples=15, deadline=None)
@given(args=st.lists(st.sampled_from(["--sampler", "ddim", "dpmpp_2m", "euler", "--steps", "2", "0", "-1", "x",
                                      "--eta", "0.5", "7", "--seeds", "1", "-5", "--n", "2", "--backend", "torch",
                                      "bogus", "--precision", "fp8", "--device", "tpu", "--quiet"]), max_size=8))
def test_cli_sample(tmp_path_factory, args):
    out = tmp_path_factory.mktemp("cli") / "grid.png"
    try:
        code = main(["sample", "--model", "digits", "--backend", "torch", "--steps", "2", "--sampler", "ddim",
                     "--quiet", "--out", str(out), *args])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    assert code in (0, 2)
    assert (code == 0) == out.exists()
