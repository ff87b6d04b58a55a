"""backend="auto": the candidates that can run the precision are timed with a fake timer (never
wall time), the fastest is taken and the verdict cached on disk per model, precision and CPU;
$DDPM_ENGINE_BACKEND overrides; reduced precision on a CPU faked to lack it runs emulated with a
warning; ``info --model`` prints the verdict."""

import json

import pytest
import torch

pytest.importorskip("openvino")

from ddpm_engine import Engine, cpu  # noqa: E402
from ddpm_engine.__main__ import main  # noqa: E402
from ddpm_engine.backends import auto, timing  # noqa: E402
from ddpm_engine.errors import EmulatedPrecisionWarning, InvalidRequestError  # noqa: E402

from .helpers import small_model  # noqa: E402

BF16_CPU = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"})
PLAIN_CPU = frozenset({"avx2", "fma"})


@pytest.fixture
def fake_timer(monkeypatch):
    """timing.time_call replaced: each backend takes ``ms_per_image[name]`` per image (torch's two
    CPU layouts alike: a tie keeps NCHW); records the calls."""
    calls = []
    ms_per_image = {}

    def fake(backend, x, t):
        calls.append((backend.name, x.shape[0]))
        return ms_per_image.get(backend.name, 1.0) * x.shape[0] / 1e3

    monkeypatch.setattr(timing, "time_call", fake)
    monkeypatch.delenv(auto.ENV, raising=False)
    return ms_per_image, calls


@pytest.fixture
def bf16_cpu(monkeypatch):
    monkeypatch.setattr(cpu, "flags", lambda: BF16_CPU)


@pytest.mark.parametrize("fastest", ["openvino", "onnxruntime", "torch"])
def test_the_fastest_candidate_is_chosen_and_remembered(fake_timer, cache, bf16_cpu, fastest):
    ms_per_image, calls = fake_timer
    ms_per_image.update({"openvino": 2.0, "onnxruntime": 3.0, "torch": 5.0, fastest: 1.0})
    loaded = small_model()
    engine = Engine(loaded, backend="auto", device="cpu")
    assert engine.backend.name == fastest
    assert {name for name, _ in calls} == {"openvino", "onnxruntime", "torch"}
    assert {b for _, b in calls} == {1, timing.TYPICAL_BATCH}
    # a few calls each, at batch 1 and the typical batch; torch's build timed its two CPU layouts too
    assert len(calls) == (3 + 2) * 2 * timing.ROUNDS
    verdict, built = auto.decide(loaded, "cpu", "fp32")
    assert (verdict.choice, verdict.source, built) == (fastest, "cached", None)
    assert len(calls) == (3 + 2) * 2 * timing.ROUNDS  # the cached verdict measured nothing
    assert verdict.ms[fastest] == {1: 1.0, timing.TYPICAL_BATCH: 1.0 * timing.TYPICAL_BATCH}


def test_a_new_cpu_or_a_corrupt_verdict_measures_again(fake_timer, cache, monkeypatch):
    ms_per_image, calls = fake_timer
    ms_per_image.update({"openvino": 2.0, "onnxruntime": 1.0, "torch": 5.0})
    loaded = small_model()
    monkeypatch.setattr(cpu, "flags", lambda: BF16_CPU)
    first, _ = auto.decide(loaded, "cpu", "fp32")
    path = auto.verdict_path(loaded, "fp32", ["openvino", "onnxruntime", "torch"])
    assert json.loads(path.read_text())["choice"] == first.choice == "onnxruntime"
    path.write_text("{not json")
    again, built = auto.decide(loaded, "cpu", "fp32")
    assert again.source == "measured" and built is not None and built.name == "onnxruntime"
    n = len(calls)
    monkeypatch.setattr(cpu, "flags", lambda: BF16_CPU | {"amx_bf16"})  # another CPU
    ms_per_image["torch"] = 0.5
    other, _ = auto.decide(loaded, "cpu", "fp32")
    assert len(calls) > n and other.choice == "torch" and other.source == "measured"


def test_bf16_considers_only_backends_that_run_it(fake_timer, cache, bf16_cpu):
    ms_per_image, calls = fake_timer
    ms_per_image.update({"openvino": 1.0, "torch": 2.0})
    engine = Engine(small_model(), backend="auto", device="cpu", precision="bf16")
    assert (engine.backend.name, engine.backend.precision) == ("openvino", "bf16")
    assert {name for name, _ in calls} == {"openvino", "torch"}
    verdict, _ = auto.decide(engine.model, "cpu", "bf16")
    assert "fp32" in verdict.skipped["onnxruntime"]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_without_native_support_reduced_precision_runs_emulated_with_a_warning(fake_timer, cache, monkeypatch,
                                                                                precision):
    _, calls = fake_timer
    monkeypatch.setattr(cpu, "flags", lambda: PLAIN_CPU)
    loaded = small_model()
    with pytest.warns(EmulatedPrecisionWarning, match=f"{precision} runs emulated"):
        engine = Engine(loaded, backend="auto", device="cpu", precision=precision)
    assert (engine.backend.name, engine.backend.precision) == ("torch", precision)
    assert len(calls) == 2 * 2 * timing.ROUNDS  # one candidate: only torch's two CPU layouts were timed
    verdict, _ = auto.decide(loaded, "cpu", precision)
    assert verdict.source == "only candidate" and "native" in verdict.skipped["openvino"]
    images = engine.sample([1, 2], sampler="ddim", steps=2)
    assert images.shape == (2, *loaded.sample_shape) and torch.isfinite(images).all()


def test_native_bf16_gives_no_warning(fake_timer, cache, bf16_cpu, recwarn):
    fake_timer[0].update({"openvino": 1.0, "torch": 2.0})
    from ddpm_engine.backends.torch_backend import TorchBackend

    TorchBackend(small_model().module, "cpu", "bf16")
    assert not [w for w in recwarn if issubclass(w.category, EmulatedPrecisionWarning)]


def test_the_environment_variable_and_backend_argument_override(fake_timer, cache, monkeypatch):
    _, calls = fake_timer
    loaded = small_model()
    monkeypatch.setenv(auto.ENV, "torch")
    assert Engine(loaded, backend="auto", device="cpu").backend.name == "torch"
    assert Engine(loaded, backend="onnxruntime", device="cpu").backend.name == "onnxruntime"
    assert len(calls) == 2 * 2 * timing.ROUNDS and {n for n, _ in calls} == {"torch"}  # only torch's CPU layouts
    monkeypatch.setenv(auto.ENV, "fastest-please")
    with pytest.raises(InvalidRequestError, match=auto.ENV):
        Engine(loaded, backend="auto", device="cpu")


def test_cuda_keeps_eager_torch(fake_timer):
    verdict, built = auto.decide(small_model(), "cuda", "fp16")
    assert (verdict.choice, verdict.source, built) == ("torch", "cuda default", None)
    assert fake_timer[1] == []


def test_info_shows_each_candidates_ms_and_the_choice(fake_timer, cache, bf16_cpu, capsys):
    fake_timer[0].update({"openvino": 1.0, "onnxruntime": 3.0, "torch": 4.0})
    assert main(["info", "--model", "digits"]) == 0
    out = capsys.readouterr().out
    assert "auto (fp32) -> openvino [measured]" in out
    assert "onnxruntime  batch 1: 3.00 ms, batch 8: 24.00 ms" in out
    assert "openvino     batch 1: 1.00 ms, batch 8: 8.00 ms   <- chosen" in out
    assert "torch layout (fp32) -> nchw [cached]" in out  # measured when auto built its torch candidate
    assert "nchw         batch 1: 4.00 ms, batch 8: 32.00 ms   <- chosen" in out


def test_candidates_are_timed_on_the_threads_they_sample_with(monkeypatch):
    """measure() times each candidate inside threads.yield_cpu_to, as the engine samples with it:
    torch on one thread beside a backend with its own pool, its own count otherwise."""
    seen = {}

    class Candidate:
        device = torch.device("cpu")

        def __init__(self, name, owns_cpu_threads):
            self.name, self.owns_cpu_threads = name, owns_cpu_threads

        def __call__(self, x, t):
            seen.setdefault(self.name, set()).add(torch.get_num_threads())
            return x

    monkeypatch.delenv("DDPM_ENGINE_THREADS", raising=False)
    monkeypatch.setattr(timing, "time_call", lambda backend, x, t: (backend(x, t), 1e-3)[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        timing.measure({"pool": Candidate("pool", True), "plain": Candidate("plain", False)}, (1, 4, 4), 1000)
        assert seen == {"pool": {1}, "plain": {2}} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
