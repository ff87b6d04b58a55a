"""bench/gpu_check.py on the CPU: the orchestration (independent sections, budgets, skips, the
JSON's structure), the real command in CPU-smoke mode, and the parsers of pytest's output; plus
bench/sections.py and bench/gpu_timing.host_us_per_step with a stand-in for a graphed sampler."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_check, gpu_timing
from bench.sections import run_section

ROOT = Path(__file__).resolve().parents[2]


def python_section(name, code, budget_s=20.0, needs_gpu=False):
    return gpu_check.Section(name, budget_s, needs_gpu, lambda out: [sys.executable, "-c", code])


def test_a_failing_or_hanging_section_does_not_stop_the_others(tmp_path):
    sections = [
        python_section("crashes", "import sys; print('about to fail'); sys.exit(3)"),
        python_section("hangs", "import time; print('sleeping', flush=True); time.sleep(60)", budget_s=1.5),
        python_section("works", "print('fine')"),
        python_section("needs_gpu", "print('never runs')", needs_gpu=True),
        python_section("late", "import time; time.sleep(6)", budget_s=30),
        python_section("after_budget", "print('never runs')"),
    ]
    lines = []
    results = gpu_check.run_sections(sections, tmp_path, total_budget_s=12, gpu=False, mode_note="test",
                                     echo=lambda line, flush=True: lines.append(line))
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())
    assert on_disk["summary"] == results["summary"] == {
        "crashes": "failed", "hangs": "timeout", "works": "ok", "needs_gpu": "skipped", "late": "ok",
        "after_budget": "skipped"}
    s = on_disk["sections"]
    assert s["crashes"]["rc"] == 3 and "about to fail" in s["crashes"]["output_tail"]
    assert "budget" in s["hangs"]["error"] and "sleeping" in s["hangs"]["output_tail"]
    assert s["needs_gpu"]["reason"].startswith("needs a CUDA GPU")
    assert s["after_budget"]["reason"].startswith("out of time")
    assert s["late"]["budget_s"] < 30  # capped by what was left of the total
    assert on_disk["mode"] == "cpu-smoke (test)" and "finished" in on_disk
    log = (tmp_path / "gpu_check.log").read_text()
    assert "fine" in log and "about to fail" in log
    assert len(lines) == 4 + 6 + 1  # a start line per section run, a result line per section, the final line


def test_cpu_smoke_run_of_the_real_sections(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--cpu-smoke",
                           "--only", "environment,driver_probe,tests_kernels,latency,throughput",
                           "--work", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DDPM_ENGINE_CACHE": str(tmp_path / "cache")})
    results = json.loads((out / "gpu_check.json").read_text())
    assert list(results["sections"]) == ["environment", "driver_probe", "tests_kernels", "latency", "throughput"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log"]  # 8 files come back at most
    env = results["sections"]["environment"]
    assert env["status"] == "ok", env
    assert env["data"]["torch"]["version"] == torch.__version__
    assert env["data"]["ddpm_engine"]["matches_tree"] is True
    assert set(env["data"]["modules"]) == set(gpu_check.MODULES)
    assert "libcudart" in env["data"]["mapped_cuda_libraries"]
    probe = results["sections"]["driver_probe"]
    if probe["status"] == "ok" and "graph_loop" in probe["data"]:  # nvcc here: sm_90 machine code plus PTX
        assert probe["data"]["graph_loop"]["device_code"] == [["ptx", 90], ["sm", 90]]
    for name in ("tests_kernels", "latency", "throughput"):
        assert results["sections"][name] == {"status": "skipped", "reason": "needs a CUDA GPU: --cpu-smoke given"}
    assert proc.returncode == (0 if probe["status"] == "ok" else 1), proc.stdout + proc.stderr
    assert (out / "gpu_check.log").read_text().count("----- environment output -----") == 1


def test_default_budgets_fit_in_eight_minutes():
    sections = gpu_check.default_sections()
    assert sum(s.budget_s for s in sections) <= gpu_check.TOTAL_BUDGET_S <= 8 * 60 - 20  # 30 s for the install
    assert len({s.name for s in sections}) == len(sections)
    assert all(s.needs_gpu for s in sections if s.name.startswith("tests_") or s.name in ("latency", "throughput"))
    assert set(gpu_check.CHILD_SECTIONS) <= {s.name for s in sections}


def test_the_readme_device_command_fits_the_device_limits():
    """One command under 2,000 characters that installs with --upgrade (a warm rerun tests the new
    code) and runs the check under ``timeout`` within 8.5 minutes in all."""
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if "bench.gpu_check --out $OUT" in line and "pip install" in line]
    assert len(commands) == 2  # the first call and the warm rerun of failed sections
    for command, most_s in zip(commands, (8.5 * 60 - 20, 4 * 60)):  # 20 s for the install
        assert len(command) <= 2000 and "--upgrade --no-compile" in command
        limit = int(re.search(r"timeout -k \d+ (\d+) ", command).group(1))
        budget = re.search(r"--budget-s (\d+)", command)
        assert (int(budget.group(1)) if budget else gpu_check.TOTAL_BUDGET_S) < limit <= most_s
    assert "--only" in commands[1]
    carry = (ROOT / "bench" / "prepare_gpu_carry.sh").read_text()
    assert "--no-build-isolation" not in carry  # fails with a python3 that has no `wheel` package


def test_sigterm_kills_the_running_section_and_keeps_what_it_wrote(tmp_path):
    """The device command's ``timeout`` sends SIGTERM: the section's process group is killed, it is
    recorded as killed, and the JSON (with partial results copied while it ran) is on disk."""
    out = tmp_path / "out"
    code = textwrap.dedent(f"""\
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from bench import gpu_check
        gpu_check.POLL_S = 0.2
        def collect(work, output):
            return {{"seen": output.count("tick")}}
        slow = gpu_check.Section("slow", 60, False, lambda w: [sys.executable, "-c",
            "import time\\nfor _ in range(600): print('tick', flush=True); time.sleep(0.05)"], collect)
        gpu_check.run_sections([slow, gpu_check.Section("next", 5, False, lambda w: ["true"])], Path({str(out)!r}),
                               gpu=False, echo=lambda *a, **k: None)
        """)
    proc = subprocess.Popen([sys.executable, "-c", code])
    json_path = out / "gpu_check.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # partial results appear while the section runs
        if json_path.is_file() and json.loads(json_path.read_text())["sections"].get("slow", {}).get("data"):
            break
        time.sleep(0.1)
    partial = json.loads(json_path.read_text())["sections"]["slow"]
    assert partial["status"] == "running" and partial["data"]["seen"] >= 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    results = json.loads(json_path.read_text())
    assert results["summary"] == {"slow": "killed"} and "SIGTERM" in results["stopped"]
    assert "tick" in results["sections"]["slow"]["output_tail"] and "finished" in results
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log"]


def test_failed_in_names_the_sections_to_rerun(tmp_path):
    results = {"sections": {"environment": {"status": "ok"}, "tests_gpu": {"status": "timeout"},
                            "latency": {"status": "failed"}, "throughput": {"status": "skipped", "reason": "out of time: 3 s"},
                            "tests_kernels": {"status": "skipped", "reason": "needs a CUDA GPU: none"}}}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(results))
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--failed-in", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "tests_gpu,latency,throughput"


def test_parse_junit_and_a_cut_short_log(tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text(textwrap.dedent("""\
        <?xml version="1.0" encoding="utf-8"?>
        <testsuites><testsuite name="pytest" errors="0" failures="1" skipped="2" tests="4" time="3.5">
          <testcase classname="tests.gpu.test_gpu_parity" name="test_a[cifar10-torch-fp16]" time="1">
            <properties><property name="eps_rel_err" value="0.0012"/></properties></testcase>
          <testcase classname="tests.gpu.test_gpu_parity" name="test_b" time="1">
            <failure message="AssertionError: 3 &gt; 2">long traceback</failure></testcase>
          <testcase classname="t" name="s1"><skipped message="backend tensorrt unavailable: x"/></testcase>
          <testcase classname="t" name="s2"><skipped message="backend tensorrt unavailable: x"/></testcase>
        </testsuite></testsuites>"""))
    data = gpu_check.parse_junit(junit)
    assert (data["tests"], data["failures"], data["skipped"], data["errors"]) == (4, 1, 2, 0)
    assert data["failed"] == [{"test": "tests.gpu.test_gpu_parity::test_b", "kind": "failure",
                               "message": "AssertionError: 3 > 2"}]
    assert data["skip_reasons"] == {"backend tensorrt unavailable: x": 2}
    assert data["properties"] == {"tests.gpu.test_gpu_parity::test_a[cifar10-torch-fp16]": {"eps_rel_err": "0.0012"}}
    log = ("tests/kernels/test_a.py::test_x[a-b] PASSED    [ 10%]\n"
           "tests/kernels/test_a.py::test_y FAILED   [ 20%]\n"
           "tests/kernels/test_a.py::test_z SKIPPED (no) [ 30%]\nnoise\n")
    assert gpu_check.parse_pytest_log(log) == {"counts_from_log": {"PASSED": 1, "FAILED": 1, "SKIPPED": 1},
                                               "failed": ["tests/kernels/test_a.py::test_y"]}


def test_run_section_records_the_error_and_goes_on(tmp_path):
    results, logged = {}, []
    out = tmp_path / "r.json"
    assert run_section(results, "bad", lambda: 1 / 0, logged.append, out) is None
    assert run_section(results, "good", lambda: {"x": 1}, logged.append, out) == {"x": 1}
    on_disk = json.loads(out.read_text())
    assert on_disk["good"] == {"x": 1} and "bad" not in on_disk
    assert on_disk["errors"]["bad"]["error"] == "ZeroDivisionError: division by zero"
    assert "Traceback" in on_disk["errors"]["bad"]["traceback"] and "1 / 0" in on_disk["errors"]["bad"]["traceback"]
    assert set(on_disk["section_seconds"]) == {"bad", "good"} and len(logged) == 1


class FakeGraph:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


class FakeGraphed:
    """What engine.graphed(...) returns, as far as host_us_per_step uses it."""

    steps = 7

    def __init__(self):
        self.runs, self.graph = [], FakeGraph()

    def run(self, seeds, driver):
        self.runs.append((tuple(seeds), driver))

    def bucket(self, n):
        return type("Bucket", (), {"graph": self.graph, "size": n})()


@pytest.mark.parametrize("driver", ["python", "c"])
def test_host_us_per_step_drives_the_graphed_api(monkeypatch, driver):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1))
    g = FakeGraphed()
    res = gpu_timing.host_us_per_step(g, [4, 5], driver, reps=3)
    assert g.runs == [((4, 5), driver)] * 4  # one warm run, then reps
    assert res["driver"] == driver and res["steps"] == 7 and res["batch"] == 2
    if driver == "python":  # the enqueue-only timing replays the bucket's graph once per step, no sync inside
        assert g.graph.replays == 7 and "enqueue_us_per_step" in res and len(syncs) == 2
    else:
        assert g.graph.replays == 0 and "enqueue_us_per_step" not in res
