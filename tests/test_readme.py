"""The README and docs/ say what the code does, and their examples run.

- Every ```python block in README.md and docs/*.md runs as pasted: each in a fresh temporary
  folder, in its own Python process. A block that needs a GPU says so in its first line
  (``# needs a CUDA GPU``) and is skipped here. README blocks stay short and run in the quick
  loop; docs/ blocks may take longer and are marked ``slow``.
- The README fits one screen's worth of reading (at most 200 lines), its Layout table names every
  module, and every relative link in README.md and docs/*.md points at a file (and heading) that
  exists.
- What the documented commands write in a checkout is git-ignored, and the server's metrics are
  all listed where the docs describe them.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200
GPU_ONLY = "# needs a CUDA GPU"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
ANY_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.M)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def python_blocks(text: str) -> list:
    """[(line number of the block's first line of code, code)] of every ```python block."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    """The text outside fenced code blocks (where links and headings are markdown)."""
    return ANY_FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set:
    seen, out = {}, set()
    for heading in HEADING.findall(prose(text)):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(text: str) -> list:
    """Every link target in the prose that is not a URL."""
    return [t for t in LINK.findall(prose(text)) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


BLOCKS = [pytest.param(doc, line, code, id=f"{rel(doc)}:{line}",
                       marks=[] if doc == README else [pytest.mark.slow])
          for doc in DOCS for line, code in python_blocks(doc.read_text())]


def test_the_extractor_finds_every_block():
    text = "a\n```python\nx = 1\n```\n```sh\nls\n```\n```python\n# needs a CUDA GPU\ny = 2\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "# needs a CUDA GPU\ny = 2\n")]
    assert len(BLOCKS) == sum(doc.read_text().count("```python") for doc in DOCS)
    assert any(doc == README for doc, *_ in (p.values for p in BLOCKS)), "the README shows Python"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One artifact cache for the blocks (an ONNX export is made once), outside the user's."""
    return tmp_path_factory.mktemp("ddpm-engine-cache")


@pytest.mark.parametrize("doc, line, code", BLOCKS)
def test_python_block_runs_as_pasted(tmp_path, cache_dir, doc, line, code):
    where = f"{rel(doc)}:{line}"
    if code.splitlines()[0].strip() == GPU_ONLY:
        pytest.skip(f"{where} needs a CUDA GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell has it
    env["DDPM_ENGINE_CACHE"] = str(cache_dir)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"{where} failed as pasted:\n{code}\n--- stderr ---\n{run.stderr[-3000:]}"


def test_the_readme_fits_in_200_lines():
    n = len(README.read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail into docs/ (at most {README_MAX_LINES})"


def test_the_link_checker_sees_what_github_renders():
    text = "# The CPU: OpenVINO, `bf16`\n## Exit, Ctrl-C\n## Exit, Ctrl-C\n```sh\n# not a heading [x](nope.md)\n```\n" \
           "[a](docs/api.md#the-cpu) [b](https://example.com) [c `d`](#exit-ctrl-c-1)\n"
    assert anchors(text) == {"the-cpu-openvino-bf16", "exit-ctrl-c", "exit-ctrl-c-1"}
    assert relative_links(text) == ["docs/api.md#the-cpu", "#exit-ctrl-c-1"]


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_every_relative_link_points_at_something_that_exists(doc):
    broken = []
    for target in relative_links(doc.read_text()):
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no {rel(dest) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {rel(dest)}")
    assert broken == [], f"{rel(doc)} links to what does not exist:\n" + "\n".join(broken)


def layout_paths(text: str) -> list:
    """The paths in the first column of the README's Layout table."""
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.find("\n## ", 1)]
    return re.findall(r"^\|\s*`([^`]+)`\s*\|", layout, re.M)


def test_the_readme_layout_names_every_module_and_only_what_exists():
    paths = layout_paths(README.read_text())
    assert [p for p in paths if not (ROOT / p).exists()] == []
    named = {(ROOT / p).resolve() for p in paths}
    modules = [p for folder in ("engine", "kernels", "export") for p in sorted((ROOT / folder).rglob("*.py"))
               if p.name != "__init__.py" or p.parent == ROOT / "engine"]
    assert [rel(p) for p in modules if p.resolve() not in named] == []


WRITTEN_BY_DOCS = ["samples.png", "grid.png", "runs/digits/model.safetensors", "digits.onnx", "golden.npz",
                   "R.json"]  # and R.md, R.png: bench.report writes them beside R.json


@pytest.mark.parametrize("path", WRITTEN_BY_DOCS)
def test_what_the_documented_commands_write_in_the_checkout_is_git_ignored(path):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    assert any(path.split("/")[0] in doc.read_text() for doc in DOCS)  # still one of the docs' outputs
    assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, f"{path} is not ignored"


METRICS_LIST = "`server.metrics()` returns a dict"


def test_the_docs_list_every_server_metric():
    from ddpm_engine import Engine

    server = Engine.from_pretrained("digits", backend="torch").serve()
    try:
        server.submit([1], sampler="ddim", steps=2).result(timeout=120)
        keys = server.metrics()
    finally:
        server.close()
    texts = {rel(doc): " ".join(doc.read_text().split()) for doc in DOCS}
    homes = [name for name, text in texts.items() if METRICS_LIST in text]
    assert len(homes) == 1, f"the metrics list needs one home, after the text {METRICS_LIST!r}: {homes}"
    text = texts[homes[0]]
    listed = text[text.index(METRICS_LIST):][:1000]
    assert [k for k in keys if f"`{k}`" not in listed] == []
