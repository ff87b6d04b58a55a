"""The engine's CPU thread policy, in one place: how many threads a backend's own pool runs, and
whether its idle threads spin (busy-wait) or sleep.

Why: on a CPU shared with another process, a thread pool whose workers spin between parallel
regions loses its core's time slices to the busy-waiting, and the sampler slows 10x or more
(bench/test_bench_threads.py starts its own competing process and measures it; README,
Performance). Idle threads that sleep cost little when the machine is idle and nothing under
load. So the default is: the runtime's own thread count (one per core), no spinning.

- torch (and AOTInductor's CPU code, same OpenMP runtime): OpenMP's wait policy is read once,
  when the OpenMP library loads with torch, so ``configure_openmp`` (called by the package's
  ``__init__``, before it imports torch) sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set
  a wait policy (OMP_WAIT_POLICY, GOMP_SPINCOUNT, KMP_BLOCKTIME) or torch was imported first
  (then OpenMP spins, so the engine samples on one torch thread: import ddpm_engine first, or
  set OMP_WAIT_POLICY=PASSIVE yourself). Thread count while sampling: ``yield_cpu_to``.
- ONNX Runtime: ``onnxruntime_options`` sets the session's intra-op thread count and
  ``session.intra_op.allow_spinning``.
- OpenVINO: ``openvino_options`` sets the CPU plugin's inference thread count.
- Any other backend with its own pool reads ``cpu_policy()`` (``threads``: None for the
  runtime's default; ``spin``) when it builds its session.

The user's override, read when a backend is built (``DDPM_ENGINE_SPIN`` for torch: before the
package is imported): ``DDPM_ENGINE_THREADS=N`` (threads per pool; torch's is process-wide) and
``DDPM_ENGINE_SPIN=1`` (let idle threads spin: each runtime's own default, 10x slower and more
under a competing process in the bench). ``train`` sets torch's count from DDPM_ENGINE_THREADS
for the whole run (``apply_torch``).

``yield_cpu_to(backend)``: torch's thread count while the engine samples (``torch_sampling_threads``):
one beside a backend with its own pool (ONNX Runtime), so two pools do not compete for the same
cores, and one where OpenMP spins; ``DDPM_ENGINE_THREADS`` otherwise, if set.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass

from .errors import InvalidRequestError

THREADS_ENV = "DDPM_ENGINE_THREADS"
SPIN_ENV = "DDPM_ENGINE_SPIN"
MAX_THREADS = 1024
# a wait policy the user chose for the OpenMP runtime (GNU, LLVM / Intel)
OPENMP_WAIT_ENVS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


@dataclass(frozen=True)
class CpuPolicy:
    threads: int | None  # threads per backend pool; None: the runtime's default (one per core)
    spin: bool  # idle pool threads busy-wait (True) or sleep (False)


def cpu_policy() -> CpuPolicy:
    """The policy from the environment (``DDPM_ENGINE_THREADS``, ``DDPM_ENGINE_SPIN``), checked."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    threads = None
    if raw:
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_THREADS:
            raise InvalidRequestError(f"{THREADS_ENV}={raw!r}: use a whole number of threads in [1, {MAX_THREADS}], "
                                      "or leave it unset for one per core")
        threads = int(raw)
    spin = os.environ.get(SPIN_ENV, "").strip()
    if spin not in ("", "0", "1"):
        raise InvalidRequestError(f"{SPIN_ENV}={spin!r}: use 1 (idle threads spin) or 0 / unset (they sleep)")
    return CpuPolicy(threads=threads, spin=spin == "1")


def configure_openmp(env=os.environ, modules=sys.modules) -> str:
    """Make OpenMP's idle threads sleep (``OMP_WAIT_POLICY=PASSIVE`` in ``env``) if the user chose
    nothing and it is not too late (torch not in ``modules``). Returns who decides how OpenMP's
    threads wait: "user" (a wait policy or DDPM_ENGINE_SPIN=1 in ``env``), "engine" (set here)
    or "spinning" (torch loaded first, with the runtime's spinning default)."""
    global OPENMP_WAIT
    if any(k in env for k in OPENMP_WAIT_ENVS) or env.get(SPIN_ENV, "").strip() == "1":
        OPENMP_WAIT = "user"
    elif "torch" in modules:
        OPENMP_WAIT = "spinning"
    else:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
        OPENMP_WAIT = "engine"
    return OPENMP_WAIT


OPENMP_WAIT = "spinning"  # configure_openmp's answer, set when the package is imported


def torch_sampling_threads(backend) -> int | None:
    """torch's thread count while the engine samples with ``backend`` (None: leave it): 1 beside a
    backend with its own pool; DDPM_ENGINE_THREADS if set; 1 if OpenMP's threads spin."""
    policy = cpu_policy()
    if getattr(backend, "owns_cpu_threads", False):
        return 1
    if policy.threads is not None:
        return policy.threads
    return 1 if OPENMP_WAIT == "spinning" and getattr(getattr(backend, "device", None), "type", None) == "cpu" else None


def apply_torch(policy: CpuPolicy | None = None) -> None:
    """Set torch's intra-op thread count (process-wide) from the policy, if it names one."""
    import torch

    policy = cpu_policy() if policy is None else policy
    if policy.threads is not None and torch.get_num_threads() != policy.threads:
        torch.set_num_threads(policy.threads)


def onnxruntime_options(options, policy: CpuPolicy | None = None):
    """Apply the policy to an ``onnxruntime.SessionOptions`` (thread count 0: ORT's default)."""
    policy = cpu_policy() if policy is None else policy
    options.intra_op_num_threads = policy.threads or 0
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if policy.spin else "0")
    return options


def openvino_options(policy: CpuPolicy | None = None) -> dict:
    """The policy as OpenVINO CPU plugin settings (0 threads: OpenVINO's default, one per core;
    OpenVINO's pool has no spin setting to apply)."""
    policy = cpu_policy() if policy is None else policy
    return {"INFERENCE_NUM_THREADS": policy.threads or 0}


# ---- lending the CPU to a backend's own pool ---------------------------------------------------
_threads_lock = threading.Lock()
_threads_users = 0
_threads_saved = None


@contextlib.contextmanager
def yield_cpu_to(backend):
    """While the engine samples with ``backend``, torch runs ``torch_sampling_threads(backend)``
    threads: beside a backend with its own CPU pool (ONNX Runtime) one, since torch's OpenMP
    workers otherwise wait after each small op and steal cores from that pool (2-core CPU,
    CIFAR-10 UNet, 10 steps: 1.36 s -> 0.98 s); one too where OpenMP's threads spin (torch was
    imported before the engine). torch's thread count is process-wide; it is restored when the
    last such run ends."""
    import torch

    global _threads_users, _threads_saved
    count = torch_sampling_threads(backend)
    if count is None:
        yield
        return
    with _threads_lock:
        if _threads_users == 0:
            _threads_saved = torch.get_num_threads()
            torch.set_num_threads(count)
        _threads_users += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_users -= 1
            if _threads_users == 0:
                torch.set_num_threads(_threads_saved)
