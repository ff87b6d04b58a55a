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


@pytest.mark.parametrize("env, modules, sets", [({}, {}, True), ({threads.SPIN_ENV: "1"}, {}, False),
                                                ({"OMP_WAIT_POLICY": "ACTIVE"}, {}, False),
                                                ({"GOMP_SPINCOUNT": "1000"}, {}, False),
                                                ({"KMP_BLOCKTIME": "0"}, {}, False), ({}, {"torch": None}, False)])
def test_openmp_wait_policy_is_set_only_when_nobody_chose_and_in_time(env, modules, sets):
    before = dict(env)
    assert threads.configure_openmp(env, modules) is sets
    assert env == ({**before, "OMP_WAIT_POLICY": "PASSIVE"} if sets else before)


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


def test_torch_threads_follow_the_setting(monkeypatch, torch_threads):
    torch.set_num_threads(2)
    monkeypatch.setenv(threads.THREADS_ENV, "1")
    Engine.from_pretrained("digits", backend="torch")
    assert torch.get_num_threads() == 1
    monkeypatch.delenv(threads.THREADS_ENV)
    Engine.from_pretrained("digits", backend="torch")
    assert torch.get_num_threads() == 1  # no setting: the process's count is left as it is


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
