"""Process lifecycle at scale: the exit scripts of tests/engine/test_lifecycle.py, 500 runs each (a
status other than 0, or "terminate called", fails the case); wall time per process."""

import pytest

from bench.measure import sync_time
from ddpm_engine import Engine
from tests.engine.process_helpers import CONCURRENT, SINGLE, assert_all_clean, run_many

RUNS = 500


@pytest.mark.parametrize("name,code", [("single", SINGLE), ("concurrent", CONCURRENT)])
def test_exit_status_over_many_processes(benchmark, name, code):
    Engine.from_pretrained("digits", device="cpu").close()  # one ONNX export for every process
    results = []
    seconds = benchmark.pedantic(lambda: sync_time(lambda: results.extend(run_many(code, RUNS)), 1, False, "cpu"),
                                 rounds=1, iterations=1)
    benchmark.group = "process lifecycle"
    benchmark.extra_info.update(script=name, runs=RUNS, seconds_per_process=round(seconds / RUNS * 2, 3))
    assert_all_clean(results)
