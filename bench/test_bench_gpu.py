"""pytest-benchmark cases for the CUDA path (all marked ``gpu``, skipped without CUDA):

    python -m pytest bench/test_bench_gpu.py --benchmark-only -q -m gpu

- issue 10's latency cases: one request at batch 1 of ONE step, DDIM-50 and DDPM-1000 (CIFAR-10
  UNet, random weights) per backend x precision (fp32 with TF32 off, tf32, fp16, bf16: engines
  built, captured and timed under ``bench.gpu_suite.math_mode``) x driver: ``auto``
  (``engine.sample(seeds)``, no driver argument), ``eager``, ``python_graph``, ``c_driver``,
  ``graph_loop`` (``GraphedSampler.run``);
- host time per step of each driver with a tiny model (the device work is negligible).
``extra_info`` has ms/step. ``python -m bench.gpu_suite`` writes the same numbers, and throughput
and the peers, to a JSON file.
"""

import pytest
import torch

from bench import gpu_suite as suite

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = [(b, m) for b in suite.BACKENDS for m in suite.backend_modes(b)]
CONFIGS = {"one_step" if steps == 1 else f"{sampler}{steps}": (sampler, steps) for sampler, steps in suite.FULL.latency}


@pytest.fixture(scope="module")
def engines():
    """(backend, mode) -> engine built under the mode's math flags; (..., sampler, steps) -> its
    captured GraphedSampler at batch 1; built once."""
    pytest.importorskip("diffusers")
    from ddpm_engine import backends

    loaded = suite.cifar_loaded()
    cache = {}

    def get(backend, mode, config=None):
        reason = backends.available("cuda").get(backend)
        if reason is not None:
            pytest.skip(f"backend {backend} unavailable: {reason}")
        if (backend, mode) not in cache:
            with suite.math_mode(mode):
                cache[backend, mode] = suite.make_engine(loaded, backend, suite.engine_precision(mode))
        eng = cache[backend, mode]
        if config is None:
            return eng
        why = suite.graph_drivers_usable(eng)
        if why is not None:
            pytest.skip(why)
        if (backend, mode, config) not in cache:
            with suite.math_mode(mode):
                cache[backend, mode, config] = suite.graphed_sampler(eng, *config, 1)
        return cache[backend, mode, config]

    yield get
    for value in cache.values():
        if hasattr(value, "close"):
            value.close()
    cache.clear()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("driver", suite.DRIVERS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend,mode", CASES)
def test_latency(benchmark, engines, backend, mode, config, driver):
    sampler, steps = CONFIGS[config]
    eng = engines(backend, mode)
    graphed = engines(backend, mode, (sampler, steps)) if driver in suite.GRAPH_DRIVERS else None
    run = suite.request_fn(eng, sampler, steps, [1], driver, graphed)

    def synced():
        run()
        torch.cuda.synchronize()

    benchmark.group = f"{config} cifar10 batch 1"
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), backend=backend, precision=mode, driver=driver)
    with suite.math_mode(mode):
        synced()  # warm-up outside the timing
        benchmark.pedantic(synced, rounds=suite.latency_reps(steps), iterations=1)
    benchmark.extra_info.update(ms_per_step=1e3 * benchmark.stats.stats.median / steps)


def test_host_us_per_step(benchmark):
    result = benchmark.pedantic(suite.host_us_per_step, rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items()}, device=torch.cuda.get_device_name())
    assert not result.get("errors"), result["errors"]
