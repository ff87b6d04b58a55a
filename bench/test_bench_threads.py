"""CPU thread policies (engine/threads.py), each workload idle and beside LOAD_PROCESSES busy loops.
Every (workload, policy, load) runs in a fresh process (OpenMP's wait policy is fixed when torch
loads it): the median of ROUNDS runs after a warm-up."""

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 3
LOAD_PROCESSES = 1
TORCH_FIRST = "BENCH_IMPORT_TORCH_FIRST"  # the child imports torch before the engine, as most scripts do
POLICIES = {"spinning": {"DDPM_ENGINE_SPIN": "1"}, "engine": {}, "torch first": {TORCH_FIRST: "1"},
            "1 thread": {"DDPM_ENGINE_THREADS": "1"}}
WORKLOADS = {"torch-sample": "torch backend, digits, DDIM-20, batch 4",
             "torch-train": "3 AdamW steps of the digits SeedUNet, batch 64",
             "onnxruntime-sample": "onnxruntime backend, digits, DDIM-20, batch 4",
             "torch-cifar": "one CIFAR-10 UNet call (35.7 M params), batch 1, torch"}
# settings of the parent that would leak into a child's runtimes
INHERITED = ("OMP_", "GOMP_", "KMP_", "MKL_NUM_THREADS", "DDPM_ENGINE_THREADS", "DDPM_ENGINE_SPIN", TORCH_FIRST)


@contextmanager
def competing_load(processes: int):
    """``processes`` busy-looping Python processes, killed on exit (whatever happens inside)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def child_env(policy: dict) -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(INHERITED)}, **policy}


def run_child(workload: str, policy: dict, rounds: int = ROUNDS) -> float:
    """The median seconds of ``workload`` in a fresh process under ``policy`` (env vars)."""
    out = subprocess.run([sys.executable, "-m", "bench.test_bench_threads", workload, str(rounds)], cwd=ROOT,
                         env=child_env(policy), capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{workload} child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["median_s"]


def workload_fn(name: str):
    """The callable a child times (imports here: the child's environment decides the runtime)."""
    from ddpm_engine import Engine  # first: the engine sets OpenMP's wait policy before torch loads it
    from ddpm_engine.models import SeedUNet

    import torch
    from torch.nn import functional as F

    if name in ("torch-sample", "onnxruntime-sample"):
        engine = Engine.from_pretrained("digits", backend=name.split("-")[0], batching=False)
        return lambda: engine.sample([1, 2, 3, 4], sampler="ddim", steps=20)
    if name == "torch-cifar":
        from ddpm_engine.models.cifar_unet import cifar10_unet

        net, x, t = cifar10_unet(seed=0).eval(), torch.randn(1, 3, 32, 32), torch.tensor([500])
        return torch.inference_mode()(lambda: net(x, t))
    if name != "torch-train":
        raise ValueError(f"unknown workload {name!r}; one of {sorted(WORKLOADS)}")
    net, x = SeedUNet(1, (32, 64, 128)), torch.randn(64, 1, 16, 16)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)

    def train():
        for _ in range(3):
            opt.zero_grad()
            F.mse_loss(net(x, torch.randint(0, 1000, (64,))), x).backward()
            opt.step()
    return train


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_thread_policy_idle_and_under_load(benchmark, workload):
    pytest.importorskip({"torch-cifar": "diffusers", "onnxruntime-sample": "onnxruntime"}.get(workload, "torch"))
    results = {}

    def table():
        for load in (0, LOAD_PROCESSES):  # policies side by side within each load, in alternation
            with competing_load(load):
                for name, policy in POLICIES.items():
                    results[(name, load)] = run_child(workload, policy)

    benchmark.pedantic(table, rounds=1, iterations=1)
    rows = {name: {"idle_s": round(results[(name, 0)], 4), "load_s": round(results[(name, LOAD_PROCESSES)], 4),
                   "slowdown_under_load": round(results[(name, LOAD_PROCESSES)] / results[(name, 0)], 2)}
            for name in POLICIES}
    benchmark.group = f"threads: {workload}"
    benchmark.extra_info.update(workload=WORKLOADS[workload], cpus=os.cpu_count(), load_processes=LOAD_PROCESSES,
                                rounds=ROUNDS, policies=rows)
    print(f"\n{workload} ({WORKLOADS[workload]}), {os.cpu_count()} CPUs, {LOAD_PROCESSES} competing process(es):")
    for name, r in rows.items():
        print(f"  {name:11s} idle {r['idle_s']:8.3f} s   under load {r['load_s']:8.3f} s   x{r['slowdown_under_load']:.2f}")


def main(argv) -> int:
    """Child: ``python -m bench.test_bench_threads WORKLOAD ROUNDS`` prints {"median_s": ...}."""
    if os.environ.get(TORCH_FIRST) == "1":
        import torch  # noqa: F401
    fn = workload_fn(argv[0])
    from bench.measure import sync_time  # after the engine: it decides OpenMP's policy before torch loads

    print(json.dumps({"median_s": sync_time(fn, reps=int(argv[1]), device="cpu")}))  # after a warm-up call
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
