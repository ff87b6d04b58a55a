"""The CPU thread policy (engine/threads.py): parsed from the environment, applied to torch and
ONNX Runtime, and OpenMP's idle threads asleep when the engine is imported before torch."""

import os
import subprocess
import sys

import pytest
import torch

from ddpm_engine import Engine, InvalidRequestError, threads
from ddpm_engine.checkpoints import load

CLEAN = ("OMP_", "GOMP_", "KMP_", threads.THREADS_ENV, threads.SPIN_ENV)


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def openmp_settings(code: str, **env) -> str:
    """What the OpenMP runtime says it read at start-up (OMP_DISPLAY_ENV) in a fresh process."""
    child = {k: v for k, v in os.environ.items() if not k.startswith(CLEAN)}
    child.update(env, OMP_DISPLAY_ENV="VERBOSE")
    out = subprocess.run([sys.executable, "-c", code + "; import torch; torch.ones(1 << 16).sum()"], env=child,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    if "GOMP_SPINCOUNT" not in out.stderr:
        pytest.skip("torch's OpenMP runtime here is not GNU libgomp (no GOMP_SPINCOUNT to read back)")
    return out.stderr


def test_openmp_threads_sleep_when_the_engine_loads_first():
    assert "GOMP_SPINCOUNT = '0'" in openmp_settings("import ddpm_engine")


def test_openmp_is_left_alone_when_torch_loaded_first():
    assert "GOMP_SPINCOUNT = '0'" not in openmp_settings("import torch, ddpm_engine")


@pytest.mark.parametrize("env, modules, who", [({}, {}, "engine"), ({threads.SPIN_ENV: "1"}, {}, "user"),
                                               ({"OMP_WAIT_POLICY": "ACTIVE"}, {}, "user"),
                                               ({"GOMP_SPINCOUNT": "1000"}, {}, "user"),
                                               ({"KMP_BLOCKTIME": "0"}, {"torch": None}, "user"),
                                               ({}, {"torch": None}, "spinning")])
def test_openmp_wait_policy_is_set_only_when_nobody_chose_and_in_time(monkeypatch, env, modules, who):
    monkeypatch.setattr(threads, "OPENMP_WAIT", threads.OPENMP_WAIT)  # restored after
    before = dict(env)
    assert threads.configure_openmp(env, modules) == who == threads.OPENMP_WAIT
    assert env == ({**before, "OMP_WAIT_POLICY": "PASSIVE"} if who == "engine" else before)


@pytest.mark.parametrize("env, policy", [({}, threads.CpuPolicy(None, False)),
                                         ({threads.THREADS_ENV: "3"}, threads.CpuPolicy(3, False)),
                                         ({threads.SPIN_ENV: "1"}, threads.CpuPolicy(None, True)),
                                         ({threads.THREADS_ENV: " 1 ", threads.SPIN_ENV: "0"}, threads.CpuPolicy(1, False))])
def test_policy_from_the_environment(monkeypatch, env, policy):
    for k in (threads.THREADS_ENV, threads.SPIN_ENV):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert threads.cpu_policy() == policy


@pytest.mark.parametrize("name, value", [(threads.THREADS_ENV, "0"), (threads.THREADS_ENV, "-2"),
                                         (threads.THREADS_ENV, "two"), (threads.THREADS_ENV, "99999"),
                                         (threads.SPIN_ENV, "yes")])
def test_a_bad_setting_is_refused_when_an_engine_is_built(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidRequestError, match=name):
        Engine.from_pretrained("digits", backend="torch")
    monkeypatch.delenv(name)
    Engine.from_pretrained("digits", backend="torch")  # and the next one works


class CpuBackend:
    device = torch.device("cpu")
    owns_cpu_threads = False


@pytest.mark.parametrize("setting, waits, owns, during", [
    (None, "engine", False, 2),       # threads sleep: torch keeps its count
    (None, "user", False, 2),
    (None, "spinning", False, 1),     # torch loaded first: spinning threads, so one
    ("3", "spinning", False, 3),      # the user's count wins
    ("3", "engine", True, 1),         # beside ONNX Runtime's own pool: one
])
def test_torch_threads_while_sampling(monkeypatch, torch_threads, setting, waits, owns, during):
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "OPENMP_WAIT", waits)
    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    if setting:
        monkeypatch.setenv(threads.THREADS_ENV, setting)
    backend = CpuBackend()
    backend.owns_cpu_threads = owns
    with threads.yield_cpu_to(backend):
        assert torch.get_num_threads() == during
    assert torch.get_num_threads() == 2


def test_an_engine_samples_with_the_set_thread_count(monkeypatch, torch_threads):
    engine = Engine.from_pretrained("digits", backend="torch", batching=False)
    seen = []
    module = engine.backend.module
    monkeypatch.setattr(engine.backend, "module", lambda x, t: seen.append(torch.get_num_threads()) or module(x, t))
    monkeypatch.setenv(threads.THREADS_ENV, "1")
    torch.set_num_threads(2)
    engine.sample([1], sampler="ddim", steps=2)
    assert seen == [1, 1] and torch.get_num_threads() == 2


@pytest.fixture(scope="module")
def digits_onnx(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from ddpm_engine.export.onnx_export import export_onnx

    return export_onnx(load("digits"), tmp_path_factory.mktemp("onnx") / "digits.onnx")


@pytest.mark.parametrize("env, count, spinning", [({}, 0, "0"), ({threads.THREADS_ENV: "1"}, 1, "0"),
                                                  ({threads.SPIN_ENV: "1"}, 0, "1")])
def test_onnxruntime_sessions_follow_the_policy(monkeypatch, digits_onnx, env, count, spinning):
    from ddpm_engine.backends.onnxruntime_backend import OnnxRuntimeBackend

    for k in (threads.THREADS_ENV, threads.SPIN_ENV):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    options = OnnxRuntimeBackend(digits_onnx).session.get_session_options()
    assert options.intra_op_num_threads == count
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == spinning


def test_apply_torch_sets_only_a_named_count(torch_threads):
    torch.set_num_threads(2)
    threads.apply_torch(threads.CpuPolicy(None, False))
    assert torch.get_num_threads() == 2
    threads.apply_torch(threads.CpuPolicy(1, False))
    assert torch.get_num_threads() == 1


def test_train_reads_the_thread_setting(monkeypatch, torch_threads, tmp_path):
    from ddpm_engine import train

    seen = []
    monkeypatch.setenv(threads.THREADS_ENV, "1")
    monkeypatch.setattr(train, "train", lambda *a, **k: seen.append(torch.get_num_threads()) or {"step": 0, "loss": 0.0})
    torch.set_num_threads(2)
    assert train.main(["--out", str(tmp_path), "--steps", "1", "--quiet"]) == 0
    assert seen == [1]
