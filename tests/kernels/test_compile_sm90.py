"""Every Triton kernel in kernels/ compiles for sm_90 (the H200 the GPU runs use), in CI, without a GPU.

Triton's interpreter, which the rest of the suite runs the kernels in, accepts code that the
compiler rejects. This test runs tests/kernels/sm90.py in a subprocess WITHOUT TRITON_INTERPRET
(with it set, ``@triton.jit`` gives interpreted functions that never compile): the kernels' own
launchers run under a stand-in driver that reports ``GPUTarget("cuda", 90, 32)``, so Triton's
binder and specialisation run and each launch compiles through ``triton.compile(ASTSource(fn,
signature, constexprs, attrs), target=...)`` down to ptxas. It fails on a compile error, on
register spills or stack use, and on a ``*_kernel`` that no launch compiled.

Adding a kernel: beside its launcher, define ``launches(t)`` in its module, yielding one
zero-argument call of the launcher per compile-time choice it can make (see
kernels/ddpm_step.py::launches); ``t`` holds stand-in tensors of one I/O dtype (x, model_output,
i, seed_words, table, x0_prev). The harness finds every module of the package with a
``launches`` and runs it for fp32, fp16 and bf16 I/O and every block size.

Cost: about 890 compiles (every launch with and without classifier-free guidance, GUIDED) at
~0.45 s each on an idle core, two worker processes (README, "Fused Triton step kernels", has the
registers per kernel).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    triton = pytest.importorskip("triton")
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").exists() or not (bin_dir / "cuobjdump").exists():
        pytest.skip(f"this triton ({triton.__version__}) ships no ptxas/cuobjdump: it cannot compile for CUDA")
    out = tmp_path_factory.mktemp("sm90") / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(out.parent / "triton-cache")  # compile now, not from an earlier run's cache
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.sm90", "--jobs", "2", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert out.is_file(), proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc


def test_every_launch_compiles_for_sm90(compiled):
    results, proc = compiled
    assert results["errors"] == [], json.dumps(results["errors"][:3], indent=1)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {c["kernel"] for c in results["compiled"]}
    assert set(results["entry_kernels"]) <= names, "kernels no `launches` compiled: " + str(
        set(results["entry_kernels"]) - names)
    assert {"_ddpm_step_kernel", "_ddim_step_kernel", "_dpmpp_2m_step_kernel", "_dpmpp_2m_sde_step_kernel",
            "_unipc_step_kernel", "_dpmpp_3m_step_kernel", "_unipc_3_step_kernel", "_ipndm_step_kernel",
            "_advance_kernel"} <= names


def test_no_register_spills_or_stack(compiled):
    results, _ = compiled
    spilling = [c for c in results["compiled"] if c["local_bytes"] or c["stack_bytes"]]
    assert spilling == [], json.dumps(spilling[:3], indent=1)
    assert all(0 < c["regs"] <= 255 for c in results["compiled"])


def test_every_constexpr_combination_and_io_dtype_is_compiled(compiled):
    """Per step kernel and I/O dtype, at the largest block: as many distinct compile-time settings
    as its module's launches (nothing collapsed, nothing left out)."""
    from types import SimpleNamespace

    import importlib

    results, _ = compiled
    fake = SimpleNamespace(x=None, model_output=None, i=None, seed_words=None, table=None, x0_prev=None)
    for module, kernels in (("ddpm_step", {"_ddpm_step_kernel"}), ("ddim_step", {"_ddim_step_kernel"}),
                            ("dpmpp_step", {"_dpmpp_2m_step_kernel", "_dpmpp_2m_sde_step_kernel"}),
                            ("unipc_step", {"_unipc_step_kernel"}), ("dpmpp_3m_step", {"_dpmpp_3m_step_kernel"}),
                            ("unipc_3_step", {"_unipc_3_step_kernel"}), ("ipndm_step", {"_ipndm_step_kernel"})):
        expected = len(list(importlib.import_module(f"ddpm_engine.kernels.{module}").launches(fake)))
        for io in ("*fp32", "*fp16", "*bf16"):
            settings = {(c["kernel"], json.dumps(c["constexprs"], sort_keys=True)) for c in results["compiled"]
                        if c["kernel"] in kernels and c["signature"]["x_ptr"] == io and c["constexprs"]["BLOCK"] == 1024}
            assert len(settings) == expected, (module, io, len(settings), expected)
        blocks = {c["constexprs"]["BLOCK"] for c in results["compiled"] if c["kernel"] in kernels}
        assert blocks == {16, 32, 64, 128, 256, 512, 1024}, (module, blocks)
