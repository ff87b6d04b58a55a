"""pytest-benchmark cases for the CUDA path (all marked ``gpu``, skipped without CUDA):

    python -m pytest bench/test_bench_gpu.py --benchmark-only -q -m gpu

- one whole sampling run (DDIM-50, CIFAR-10 UNet, random weights) per backend/precision and
  driver: ``python`` (Engine.sample's eager loop), ``python_graph`` (CUDA-graph replay from a
  Python loop), ``c_driver`` (the C loop of cuGraphLaunch), at batch 1 and 64;
- host time per step of each driver with a tiny model (the device work is negligible).
``extra_info`` has ms/step and images/s. ``python -m bench.gpu_suite`` writes the same numbers to a JSON file.
"""

import pytest
import torch

from bench import gpu_suite as suite

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS = 50
DRIVERS = {"python": None, "python_graph": "python", "c_driver": "c"}
CASES = [(b, p) for b in ("torch", "aoti", "onnxruntime", "tensorrt") for p in ("fp32", "fp16", "bf16")
         if b != "onnxruntime" or p == "fp32"]


@pytest.fixture(scope="module")
def samplers():
    """(backend, precision) -> (engine, its graphed DDIM-50 sampler up to batch 64), built once."""
    pytest.importorskip("diffusers")
    from ddpm_engine import backends

    loaded = suite.cifar_loaded()
    cache = {}

    def get(backend, precision):
        reason = backends.available("cuda").get(backend)
        if reason is not None:
            pytest.skip(f"backend {backend} unavailable: {reason}")
        if (backend, precision) not in cache:
            eng = suite.make_engine(loaded, backend, precision)
            cache[backend, precision] = (eng, eng.graphed("ddim", STEPS, max_batch=64))
        return cache[backend, precision]

    yield get
    cache.clear()
    torch.cuda.empty_cache()


def _synced(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@pytest.mark.parametrize("driver", list(DRIVERS))
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("backend,precision", CASES)
def test_ddim50_run(benchmark, samplers, backend, precision, batch, driver):
    eng, gs = samplers(backend, precision)
    seeds = list(range(1, batch + 1))
    if DRIVERS[driver] is None:
        fn = _synced(lambda: eng.sample(seeds, sampler="ddim", steps=STEPS))
    else:
        fn = _synced(lambda: gs.run(seeds, driver=DRIVERS[driver]))
    fn()  # capture / compile / warm-up outside the timing
    benchmark.group = f"ddim-{STEPS} cifar10 batch {batch}"
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), backend=backend, precision=precision,
                                driver=driver)
    benchmark.pedantic(fn, rounds=3, iterations=1)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(ms_per_step=1e3 * seconds / STEPS, images_per_s=batch / seconds)


def test_host_us_per_step(benchmark):
    result = benchmark.pedantic(suite.host_us_per_step, rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items()}, device=torch.cuda.get_device_name())
    assert not result.get("errors"), result["errors"]
