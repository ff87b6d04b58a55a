"""What the CPU underneath can do, detected (never assumed): its model name, its feature flags and
whether it has native reduced-precision arithmetic.

- ``model()``: the CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ...");
- ``flags()``: its feature flags as a frozenset ("avx512f", "avx512_bf16", "amx_bf16", ...), from
  /proc/cpuinfo on Linux (empty elsewhere: nothing is then assumed to be native);
- ``native_bf16()``: bf16 dot products in hardware (AVX512_BF16 or AMX-BF16 on x86, BF16 on Arm);
  without them bf16 is emulated through fp32 and runs slower than fp32 itself;
- ``native_fp16()``: fp16 arithmetic in hardware (AVX512-FP16 or AMX-FP16 on x86, FPHP/ASIMDHP on Arm).

Tests fake a CPU by monkeypatching ``flags`` (and ``model``).
"""

from __future__ import annotations

import functools
import platform

NATIVE_BF16 = ("avx512_bf16", "amx_bf16", "bf16")
NATIVE_FP16 = ("avx512_fp16", "amx_fp16", "asimdhp")
NATIVE_INT8 = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")  # int8 dot products (VNNI, AMX, Arm's SDOT)


@functools.lru_cache(maxsize=2)
def _cpuinfo(path: str = "/proc/cpuinfo") -> dict:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    if fields:
                        break
                    continue
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    return fields


def model() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine() or "unknown CPU"


def flags() -> frozenset:
    info = _cpuinfo()
    return frozenset((info.get("flags") or info.get("Features") or "").split())


def native_bf16() -> bool:
    return any(f in flags() for f in NATIVE_BF16)


def native_fp16() -> bool:
    return any(f in flags() for f in NATIVE_FP16)


def native_int8() -> bool:
    return any(f in flags() for f in NATIVE_INT8)


def native(precision: str) -> bool:
    """Whether ``precision`` ("fp32", "bf16", "fp16", "int8") runs natively on this CPU (fp32
    always does; int8: with int8 dot products, without which it still runs, slower)."""
    return {"fp32": True, "bf16": native_bf16(), "fp16": native_fp16(), "int8": native_int8()}[precision]


def describe() -> str:
    """The CPU's model and the flags that decide the fast paths, for reports and bench records."""
    shown = [f for f in sorted(flags()) if f.startswith(("avx512", "amx", "avx2", "fma", "bf16", "asimd"))]
    return f"{model()} ({', '.join(shown) or 'no AVX2/AVX-512/AMX flags'})"
