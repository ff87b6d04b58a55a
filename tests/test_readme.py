"""Every ```python block in README.md runs as pasted: each in a fresh temporary folder, in its own
Python process. A block that needs a GPU says so in its first line (``# needs a CUDA GPU``) and
is skipped here."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
GPU_ONLY = "# needs a CUDA GPU"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)


def python_blocks(text: str) -> list:
    """[(line number of the block's first line of code, code)] of every ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


BLOCKS = python_blocks(README.read_text())


def test_the_extractor_finds_every_block():
    text = "a\n```python\nx = 1\n```\n```sh\nls\n```\n```python\n# needs a CUDA GPU\ny = 2\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "# needs a CUDA GPU\ny = 2\n")]
    assert len(BLOCKS) == README.read_text().count("```python")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One artifact cache for the blocks (an ONNX export is made once), outside the user's."""
    return tmp_path_factory.mktemp("ddpm-engine-cache")


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs_as_pasted(tmp_path, cache_dir, line, code):
    if code.splitlines()[0].strip() == GPU_ONLY:
        pytest.skip(f"README.md:{line} needs a CUDA GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    env["DDPM_ENGINE_CACHE"] = str(cache_dir)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"README.md:{line} failed as pasted:\n{code}\n--- stderr ---\n{run.stderr[-3000:]}"


WRITTEN_BY_README = ["samples.png", "grid.png", "runs/digits/model.safetensors", "digits.onnx", "golden.npz",
                     "R.json"]  # and R.md, R.png: bench.report writes them beside R.json


@pytest.mark.parametrize("path", WRITTEN_BY_README)
def test_what_the_readme_commands_write_in_the_checkout_is_git_ignored(path):
    root = README.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    assert path.split("/")[0] in README.read_text()  # still one of README's outputs
    assert subprocess.run(["git", "check-ignore", "-q", path], cwd=root).returncode == 0, f"{path} is not ignored"


def test_readme_lists_every_server_metric():
    from ddpm_engine import Engine

    server = Engine.from_pretrained("digits", backend="torch").serve()
    try:
        server.submit([1], sampler="ddim", steps=2).result(timeout=120)
        keys = server.metrics()
    finally:
        server.close()
    text = " ".join(README.read_text().split())
    listed = text[text.index("`server.metrics()` returns a dict"):][:1000]
    assert [k for k in keys if f"`{k}`" not in listed] == []
