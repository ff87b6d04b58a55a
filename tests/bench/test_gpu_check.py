"""bench/gpu_check.py on the CPU: the orchestration (independent sections, budgets, skips, SIGTERM, the
JSON's structure), the real command in CPU-smoke mode, the parsers of pytest's output, the rows the
measuring sections write (the digits model at 1-3 steps: the numbers are only checked to be
positive and finite) and what ``measured`` gathers for the report."""

import json
import math
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

from bench import gpu_check, measure
from ddpm_engine.checkpoints import load

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


def smoke(tmp_path, only):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--cpu-smoke", "--only", only,
                           "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DDPM_ENGINE_CACHE": str(tmp_path / "cache")})
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log"]  # 8 files come back at most
    return proc, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.log").read_text()


def test_cpu_smoke_records_the_environment_and_skips_the_gpu_tests(tmp_path):
    proc, results, log = smoke(tmp_path, "environment,tests_kernels")
    assert list(results["sections"]) == ["environment", "tests_kernels"] and proc.returncode == 0, proc.stdout
    env = results["sections"]["environment"]
    assert env["status"] == "ok", env
    assert env["data"]["versions"]["torch"] == torch.__version__ == results["measured"]["versions"]["torch"]
    assert env["data"]["ddpm_engine"]["matches_tree"] is True
    assert "libcudart" in env["data"]["mapped_cuda_libraries"]
    assert results["sections"]["tests_kernels"] == {"status": "skipped", "reason": "needs a CUDA GPU: --cpu-smoke given"}
    assert log.count("----- environment output -----") == 1


@pytest.mark.slow
def test_cpu_smoke_runs_the_measuring_sections_small(tmp_path):
    """The device command's measuring steps, on the CPU at the smoke scale: every part runs, the
    graph drivers say why they are skipped, and ``measured`` gathers the rows for the report."""
    pytest.importorskip("diffusers")
    from ddpm_engine.engine import DRIVERS

    proc, results, _ = smoke(tmp_path, "driver_probe,latency,throughput")
    probe = results["sections"]["driver_probe"]
    if probe["status"] == "ok" and "graph_loop" in probe["data"]:  # nvcc here: sm_90 machine code plus PTX
        assert probe["data"]["graph_loop"]["device_code"] == [["ptx", 90], ["sm", 90]]
    assert proc.returncode == (0 if probe["status"] == "ok" else 1), proc.stdout + proc.stderr
    latency, throughput = (results["sections"][name] for name in ("latency", "throughput"))
    assert latency["status"] == throughput["status"] == "ok", (latency, throughput)
    assert not latency["data"].get("errors") and not throughput["data"].get("errors")
    for driver in ("python", "c", "graph_loop"):
        assert latency["data"][driver] == {"skipped": "the graph drivers need CUDA"}
    m = results["measured"]
    assert [r["driver"] for r in m["latency"]] == [d for d in DRIVERS if d in ("auto", "eager")]
    assert all(r["steps"] == measure.SMOKE.steps and r["seconds"] > 0 for r in m["latency"])
    assert [(p["name"], p["precision"]) for p in m["peers"]] == [("diffusers DDPMPipeline", "fp32")]
    assert [(r["precision"], r["driver"], r["batch"]) for r in m["throughput"]] == [("fp32", "eager", 2), ("bf16", "eager", 2)]
    assert m["host_us_per_step"]["eager"] > 0 and m["matmul_peak_tflops"] > 0
    assert 11.5e9 < m["flops_per_image_step"]["cifar10"] < 12.5e9 and m["device"].startswith("CPU")


def test_default_budgets_fit_in_eight_minutes():
    sections = gpu_check.default_sections()
    assert sum(s.budget_s for s in sections) <= gpu_check.TOTAL_BUDGET_S <= 8 * 60 - 20  # 30 s for the install
    assert len({s.name for s in sections}) == len(sections)
    assert all(s.needs_gpu for s in sections if s.name.startswith("tests_") or s.name in ("latency", "throughput"))
    later = gpu_check.later_sections()
    assert set(gpu_check.CHILD_SECTIONS) == {s.name for s in sections + later if not s.name.startswith("tests_")}
    assert all(s.needs_gpu and s.smokes and s.budget_s <= 520 for s in later)  # each fits one later call of 540 s


def test_the_runbook_device_command_fits_the_device_limits():
    """Each device command is under 2,000 characters, installs with --upgrade (a warm rerun tests the
    new code) and runs the check under ``timeout``: the first call within 8.5 minutes in all, the
    rerun of failed sections within the 4 minutes left, a later full-bench call within 10."""
    readme = (ROOT / "bench" / "README.md").read_text()
    commands = [line for line in readme.splitlines() if "bench.gpu_check --out $OUT" in line and "pip install" in line]
    assert len(commands) == 3  # the first call, the warm rerun of failed sections, a later full-bench call
    for command, most_s in zip(commands, (8.5 * 60 - 20, 4 * 60, 10 * 60 - 40)):  # 20 s for the install
        assert len(command) <= 2000 and "--upgrade --no-compile" in command
        limit = int(re.search(r"timeout -k \d+ (\d+) ", command).group(1))
        budget = re.search(r"--budget-s (\d+)", command)
        assert (int(budget.group(1)) if budget else gpu_check.TOTAL_BUDGET_S) < limit <= most_s
    assert "--only" not in commands[0] and "--only tests_gpu,latency" in commands[1] and "--only matrix" in commands[2]
    assert "bash bench/prepare_gpu_carry.sh" in readme
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
        from bench import gpu_check, measure
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


def test_run_part_records_the_error_and_goes_on(tmp_path, capsys):
    results, out = {}, tmp_path / "r.json"
    assert gpu_check.run_part(results, "bad", lambda: 1 / 0, out) is None
    assert gpu_check.run_part(results, "good", lambda: {"x": 1}, out) == {"x": 1}
    on_disk = json.loads(out.read_text())
    assert on_disk["good"] == {"x": 1} and "bad" not in on_disk
    assert on_disk["errors"]["bad"]["error"] == "ZeroDivisionError: division by zero"
    assert "Traceback" in on_disk["errors"]["bad"]["traceback"] and "1 / 0" in on_disk["errors"]["bad"]["traceback"]
    assert set(on_disk["section_seconds"]) == {"bad", "good"} and capsys.readouterr().out.startswith("bad failed: Zero")


@pytest.fixture(scope="module")
def digits():
    return load("digits")


QUICK = measure.Scale("cpu", steps=3, latency=(("ddpm", 1), ("ddim", 2), ("ddpm", 3)), batches=(2, 4), matrix_steps=2)


def check_rows(rows, kind, keys):
    assert rows and json.loads(json.dumps(rows)) == rows and {r["kind"] for r in rows} == {kind}
    for r in rows:
        assert keys <= set(r), sorted(keys - set(r))
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("seconds", "ms_per_step", "seconds_per_step",
                                                               "images_per_s") if k in r), r


def test_latency_rows_one_per_setting_and_cpu_driver(digits):
    notes = []
    rows = measure.rows(digits, "torch", "tf32", QUICK, notes, batches=[])
    check_rows(rows, "latency", {"model", "backend", "precision", "driver", "batch", "sampler", "steps", "seconds",
                                 "ms_per_step", "reps"})
    assert sorted((r["sampler"], r["steps"], r["driver"]) for r in rows) == sorted(
        (s, n, d) for s, n in QUICK.latency for d in ("auto", "eager"))
    assert {(r["model"], r["backend"], r["precision"], r["batch"]) for r in rows} == {("digits", "torch", "tf32", 1)}
    assert all(r["ms_per_step"] == pytest.approx(1e3 * r["seconds"] / r["steps"]) for r in rows)
    assert notes == ["torch/tf32: python, c, graph_loop skipped: the graph drivers need CUDA"]


def test_throughput_rows_cover_the_batches(digits):
    rows = measure.rows(digits, "torch", "fp32", QUICK, [], latency=[])
    check_rows(rows, "throughput", {"model", "backend", "precision", "driver", "batch", "steps", "steps_measured",
                                    "seconds_per_step", "images_per_s"})
    assert sorted((r["batch"], r["driver"]) for r in rows) == [(2, "auto"), (2, "eager"), (4, "auto"), (4, "eager")]
    for r in rows:
        assert r["steps"] == QUICK.steps and r["steps_measured"] == QUICK.matrix_steps
        assert r["images_per_s"] == pytest.approx(r["batch"] / (r["seconds_per_step"] * QUICK.steps))


PEER_KEYS = {"name", "model", "precision", "batch", "sampler", "steps", "steps_measured", "seconds", "images_per_s"}


def test_diffusers_peer_row_with_a_tiny_unet2d(digits):
    diffusers = pytest.importorskip("diffusers")
    from ddpm_engine.checkpoints import from_module
    from ddpm_engine.models.cifar_unet import CIFAR10_SCHEDULER_CONFIG, DiffusersUNet

    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                 layers_per_block=1, norm_num_groups=8).eval()
    loaded = from_module(DiffusersUNet(unet), CIFAR10_SCHEDULER_CONFIG, (1, 8, 8), "tiny")
    row = measure.diffusers_peer_row(loaded, "fp32", 2, QUICK, steps_measured=2)
    check_rows([row], "peers", PEER_KEYS)
    assert (row["name"], row["precision"], row["batch"], row["steps"], row["steps_measured"]) == (
        "diffusers DDPMPipeline", "fp32", 2, 3, 2)
    assert row["images_per_s"] == pytest.approx(2 / row["seconds"])
    with pytest.raises(TypeError, match="UNet2DModel"):
        measure.diffusers_peer_row(digits, "fp32", 1, QUICK, 3)


def test_measured_gathers_the_rows_and_the_headline_repeats_them():
    row = {"kind": "latency", "model": "cifar10", "backend": "torch", "precision": "fp32", "driver": "c", "batch": 1,
           "sampler": "ddpm", "steps": 1000, "seconds": 0.5}
    tput = {"kind": "throughput", "precision": "bf16", "driver": "c", "batch": 256, "images_per_s": 900.0}
    results = {"sections": {
        "environment": {"data": {"versions": {"torch": "2.11"}, "torch": {"device": "NVIDIA H200"}}},
        "latency": {"data": {"c": row, "python": {"skipped": "why"}, "host_us_per_step": {"eager": 900.0, "c": 4.0}}},
        "throughput": {"data": {"matmul_peak_tflops_bf16": 750.0, "model": {"flops_per_image_step": 1.2e10},
                                "b256_bf16": tput}},
        "matrix": {"data": {"torch_fp32": [row, dict(row, driver="eager")]}},
        "tests_gpu": {"data": {"properties": {
            "tests.gpu.test_gpu_parity::test_model_output_matches_eager_fp32[cifar10-aoti-bf16]": {"eps_rel_err": "0.01"},
            "tests.gpu.test_gpu_parity::test_ddpm_1000_run_matches_eager_fp32[cifar10-aoti-bf16]": {
                "image_max_abs": "0.2", "psnr_db": "35.5"}}}}}}
    m = gpu_check.measured(results)
    assert m["device"] == "NVIDIA H200" and m["versions"] == {"torch": "2.11"} and m["matmul_peak_tflops"] == 750.0
    assert m["flops_per_image_step"] == {"cifar10": 1.2e10} and m["host_us_per_step"]["c"] == 4.0
    assert [r["section"] for r in m["latency"]] == ["latency.c", "matrix.torch_fp32", "matrix.torch_fp32"]
    assert [r["section"] for r in m["throughput"]] == ["throughput.b256_bf16"] and m["peers"] == []
    assert m["parity"] == [{"kind": "parity", "model": "cifar10", "backend": "aoti", "precision": "bf16", "driver": "auto",
                            "section": "tests_gpu", "eps_rel_err": 0.01, "image_max_abs": 0.2, "psnr_db": 35.5}]
    assert gpu_check.headline_lines(results) == [
        "latency b1 ddpm-1000 fp32 c: 0.500 s", "throughput b256 bf16 (c): 900.0 images/s", "bf16 matmul peak: 750 TFLOP/s",
        "host us per step: eager 900.0, c 4.0"]
