"""Ray Serve replicas under load: one local Ray serves the digits model with 1, then 2 replicas (one
CPU and one OpenMP thread each); test_bench_load.py's clients POST to /sample over loopback."""

import json
import socket
import urllib.request

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'ddpm-engine[ray]'")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from bench.measure import client_load  # noqa: E402
from ddpm_engine import ray_serve  # noqa: E402

CLIENTS, REQUESTS, TIME_LIMIT_S = 16, 4, 120  # as test_bench_load.py's
REPLICA_OPTIONS = {"num_cpus": 1, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}}


@pytest.fixture(scope="module")
def http_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:  # a small shared machine: see tests/engine/test_ray_serve.py
        mp.setenv("RAY_worker_niceness", "0")
        mp.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
        ray_serve.start(host="127.0.0.1", port=port, num_cpus=2, include_dashboard=False,
                        object_store_memory=128 * 2**20, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield port
    serve.shutdown()
    ray.shutdown()


def post_sample(url, seeds):
    body = json.dumps({"seeds": seeds, "sampler": "ddim", "steps": 20}).encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return ray_serve.from_json(json.load(resp))


@pytest.mark.parametrize("replicas", [1, 2])
def test_ray_load(benchmark, http_port, replicas):
    serve.run(ray_serve.app("digits", num_replicas=replicas, ray_actor_options=REPLICA_OPTIONS, max_batch_size=32,
                            device="cpu", backend="torch"), route_prefix="/ddpm")
    url = f"http://127.0.0.1:{http_port}/ddpm/sample"
    for seed in range(4 * replicas):  # warm every replica up
        post_sample(url, [seed])
    result = benchmark.pedantic(client_load, (lambda seeds: post_sample(url, seeds), CLIENTS, REQUESTS, TIME_LIMIT_S),
                                rounds=1, iterations=1)
    benchmark.group = "ray serve load"
    benchmark.extra_info.update(replicas=replicas, clients=CLIENTS, **result)
    print(f"\n{replicas} replica(s) {result['images_per_s']:7.1f} images/s  p50 {result['p50_s'] * 1e3:7.1f} ms  "
          f"p99 {result['p99_s'] * 1e3:7.1f} ms")
