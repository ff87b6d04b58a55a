"""The distribution installs one import name: a wheel built from the repository holds only
``ddpm_engine`` (engine/, kernels/ and export/ mapped into it) and its data files, and carries
``ddpm_engine.__version__`` as its version."""

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import ddpm_engine

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_only_ddpm_engine_at_the_top_and_its_version(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("ddpm_engine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"ddpm_engine"}, top
    for needed in ("ddpm_engine/__init__.py", "ddpm_engine/kernels/ddpm_step.py", "ddpm_engine/export/onnx_export.py",
                   "ddpm_engine/kernels/csrc/c_loop.c", "ddpm_engine/bundled/digits/model.safetensors"):
        assert needed in names, needed
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "ddpm-engine = ddpm_engine.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert Parser().parsestr(zipfile.ZipFile(wheel).read(metadata).decode())["Version"] == ddpm_engine.__version__
