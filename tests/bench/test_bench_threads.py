"""The thread bench's own machinery: its competing load starts and always stops, and a child
inherits none of the parent's thread settings."""

import pytest

from bench.test_bench_threads import POLICIES, TORCH_FIRST, child_env, competing_load


def test_the_competing_load_runs_inside_and_is_gone_after_even_on_error():
    with pytest.raises(RuntimeError):
        with competing_load(2) as procs:
            assert len(procs) == 2 and all(p.poll() is None for p in procs)
            raise RuntimeError("a failing measurement")
    assert all(p.poll() is not None for p in procs)


def test_a_child_gets_only_its_policy(monkeypatch):
    for k, v in {"OMP_NUM_THREADS": "7", "OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "1",
                 "DDPM_ENGINE_THREADS": "5", TORCH_FIRST: "1"}.items():
        monkeypatch.setenv(k, v)
    for policy in POLICIES.values():
        env = child_env(policy)
        leaked = {k for k in env if k.startswith(("OMP_", "GOMP_", "DDPM_ENGINE_", TORCH_FIRST))} - set(policy)
        assert leaked == set() and all(env[k] == v for k, v in policy.items())
