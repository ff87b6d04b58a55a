"""Compile every Triton kernel in kernels/ for the GPU machine's target, sm_90 (H100/H200), without a GPU.

    python -m tests.kernels.sm90 --jobs 2 --out R.json      # TRITON_INTERPRET must be unset

Triton's interpreter (TRITON_INTERPRET=1, how the rest of the suite runs the kernels) accepts code
the compiler rejects, so this runs the kernels' own launchers with Triton's real JIT path: a
stand-in driver (``Sm90StandIn``) reports ``GPUTarget("cuda", 90, 32)``, so each launch binds its
arguments, specialises them (dtypes, 16-byte alignment, integer divisibility) and calls
``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=...)``, which runs the whole
pipeline down to ptxas (it ships with Triton). "Loading" a compiled kernel reads its registers,
stack and local memory (spills) from the cubin with Triton's cuobjdump; launching does nothing.

What is compiled: every module of the kernels package that defines a ``launches(t)`` function
(beside its launcher) yields one zero-argument launch per compile-time choice its launcher can
make, on stand-in tensors ``t`` (``inputs``: x, model_output, i, seed_words, table, x0_prev). Each
module's launches run for fp32, fp16 and bf16 I/O at a sample of 3 x 32 x 32 (the largest block,
1024, as on the CIFAR model), and the first launch of each module at every other block size
``block_for`` returns, one of them on a size that is not a multiple of 16. A new kernel adds its
``launches`` beside its launcher; tests/kernels/test_compile_sm90.py fails for a ``*_kernel``
that no launch compiled.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

PACKAGE = "ddpm_engine.kernels"
DTYPES = ("float32", "float16", "bfloat16")
FULL_NUMEL = 3 * 32 * 32  # block 1024
OTHER_NUMELS = (16, 32, 64, 128, 256, 500)  # blocks 16 .. 512; 500 is not a multiple of 16
MAX_SHARED = 232448  # bytes of shared memory per block on sm_90 (227 KiB)


def kernel_modules() -> list[str]:
    """The kernels package's modules that declare ``launches`` (imported: it imports triton)."""
    pkg = importlib.import_module(PACKAGE)
    names = [f"{PACKAGE}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    return [n for n in names if hasattr(importlib.import_module(n), "launches")]


def entry_kernels() -> set[str]:
    """Every ``@triton.jit`` function named ``*_kernel`` in the kernels package (the launchable ones;
    the other jit functions are helpers compiled inside them)."""
    from triton.runtime.jit import JITFunction

    pkg = importlib.import_module(PACKAGE)
    found = set()
    for m in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{PACKAGE}.{m.name}")
        found |= {name for name, v in vars(module).items() if isinstance(v, JITFunction) and name.endswith("_kernel")}
    return found


def inputs(dtype: str, numel: int, batch: int = 2):
    """Stand-in tensors on the CPU (the stand-in driver launches nothing): flat [batch, numel] I/O."""
    import torch

    from ddpm_engine.schedules import COLUMNS

    dt = getattr(torch, dtype)
    return SimpleNamespace(x=torch.randn(batch, numel).to(dt), model_output=torch.randn(batch, numel).to(dt),
                           x0_prev=torch.zeros(batch, numel, dtype=dt), i=torch.zeros(batch, dtype=torch.int64),
                           seed_words=torch.zeros(batch, 2, dtype=torch.int64),
                           table=torch.rand(10, len(COLUMNS), dtype=torch.float32))


class Sm90StandIn:
    """Triton's active driver for an H200 that is not there: the target is sm_90, loading a kernel
    reads its resource usage from the cubin, and a launch only counts."""

    def __init__(self):
        import triton

        self.target = triton.backends.compiler.GPUTarget("cuda", 90, 32)
        self.utils = self
        self.cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        self.loaded, self.launches, self._pending = [], 0, None

    # the driver's interface, as far as Triton's JIT path uses it
    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def get_device_properties(self, device):
        return {"max_shared_mem": MAX_SHARED, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def launcher_cls(self, src, metadata):
        self._pending = (src, metadata)

        def launch(*args, **kwargs):
            self.launches += 1

        return launch

    def load_binary(self, name, cubin, shared, device):
        src, metadata = self._pending
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            usage = subprocess.run([self.cuobjdump, "-res-usage", f.name], capture_output=True, text=True,
                                   check=True).stdout
        res = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
        regs, local = int(res.get("REG", -1)), int(res.get("LOCAL", 0))
        self.loaded.append({"kernel": name, "signature": {k: str(v) for k, v in src.signature.items()},
                            "constexprs": {src.fn.arg_names[k[0]]: v for k, v in src.constants.items() if len(k) == 1},
                            "num_warps": metadata.num_warps, "regs": regs, "local_bytes": local,
                            "stack_bytes": int(res.get("STACK", 0)), "shared_bytes": shared})
        return None, None, regs, local // 4, 1024  # module, function, n_regs, n_spills, max threads

    def unload_module(self, module):
        pass


_driver = None


def _start_worker():
    global _driver
    from triton.runtime import driver

    _driver = Sm90StandIn()
    driver.set_active(_driver)


def _run(task):
    """Launch one module's launches (all, or only the first) for one dtype and sample size."""
    module, dtype, numel, only_first = task
    t0 = time.perf_counter()
    before, errors = len(_driver.loaded), []
    for k, launch in enumerate(importlib.import_module(module).launches(inputs(dtype, numel))):
        try:
            launch()
        except Exception as exc:  # a compile error: recorded with where it came from
            errors.append({"module": module, "dtype": dtype, "numel": numel, "launch": k,
                           "error": f"{type(exc).__name__}: {exc}"[:2000]})
        if only_first:
            break
    return {"compiled": _driver.loaded[before:], "errors": errors, "seconds": time.perf_counter() - t0}


def tasks(modules) -> list:
    return ([(m, d, FULL_NUMEL, False) for m in modules for d in DTYPES]
            + [(m, "float32", n, True) for m in modules for n in OTHER_NUMELS])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--out", required=True, help="results JSON")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("unset TRITON_INTERPRET: this compiles for the GPU, not for Triton's interpreter")
    t0 = time.perf_counter()
    modules = kernel_modules()
    compiled, errors = [], []
    with concurrent.futures.ProcessPoolExecutor(args.jobs, initializer=_start_worker) as pool:
        for res in pool.map(_run, sorted(tasks(modules), key=lambda t: t[3])):  # the long tasks first
            compiled += res["compiled"]
            errors += res["errors"]
    import triton

    out = {"triton": triton.__version__, "target": "cuda sm_90", "modules": modules,
           "entry_kernels": sorted(entry_kernels()), "compiled": compiled, "errors": errors,
           "seconds": round(time.perf_counter() - t0, 1), "jobs": args.jobs}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    by_kernel = {}
    for c in compiled:
        by_kernel.setdefault(c["kernel"], []).append(c["regs"])
    for name, regs in sorted(by_kernel.items()):
        print(f"{name}: {len(regs)} variants, registers {min(regs)}-{max(regs)}")
    print(f"{len(compiled)} variants compiled for sm_90, {len(errors)} errors, {out['seconds']} s with {args.jobs} jobs")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
