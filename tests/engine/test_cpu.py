"""CPU detection: /proc/cpuinfo's first processor parsed, native bf16 / fp16 read from its flags
(x86 and Arm names), nothing assumed where there is no cpuinfo."""

from ddpm_engine import cpu

ZEN4 = """processor\t: 0
model name\t: AMD EPYC 9R14
flags\t\t: fpu avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni

processor\t: 1
model name\t: second processor, not read
flags\t\t: fpu
"""


def test_the_first_processor_is_parsed(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(ZEN4)
    info = cpu._cpuinfo(str(path))
    assert info["model name"] == "AMD EPYC 9R14"
    assert set(info["flags"].split()) == {"fpu", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"}
    assert cpu._cpuinfo(str(tmp_path / "absent")) == {}


def test_native_precisions_follow_the_flags(monkeypatch):
    cases = [({"avx2", "fma"}, False, False), ({"avx512f", "avx512_bf16"}, True, False),
             ({"amx_bf16", "amx_fp16", "avx512_fp16"}, True, True), ({"asimd", "asimdhp", "bf16"}, True, True)]
    for flags, bf16, fp16 in cases:
        monkeypatch.setattr(cpu, "flags", lambda flags=flags: frozenset(flags))
        assert (cpu.native("fp32"), cpu.native("bf16"), cpu.native("fp16")) == (True, bf16, fp16), flags
    monkeypatch.setattr(cpu, "flags", lambda: frozenset({"avx512_bf16", "sse2"}))
    assert "avx512_bf16" in cpu.describe() and "sse2" not in cpu.describe()
    monkeypatch.setattr(cpu, "flags", lambda: frozenset())
    assert "no AVX2/AVX-512/AMX flags" in cpu.describe()


def test_this_machine_is_described():
    assert cpu.model() and isinstance(cpu.flags(), frozenset)
