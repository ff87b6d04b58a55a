"""The GPU bench: verification and the headline numbers in one device call, the full matrix in a later one.

    python -m bench.gpu_check --out DIR                   # on the GPU machine: the one command's sections
    python -m bench.gpu_check --out DIR --cpu-smoke       # anywhere: the same steps, small, on the CPU
    python -m bench.gpu_check --out DIR --only matrix     # a full-bench section, in a later call
    python -m bench.gpu_check --failed-in gpu_check.json  # the --only value of a warm rerun

Writes DIR/gpu_check.json (rewritten as results come) and DIR/gpu_check.log, nothing else; each
section runs in its own process with its own budget. bench/README.md is the runbook.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 460  # the device command allows 480 (timeout), plus the install: 8.5 minutes
MIN_SECTION_S = 5  # a section with less time than this left is skipped
POLL_S = 2.0  # how often a running section's partial results are copied into gpu_check.json
DEFAULT_TESTS_K = "not aoti and not compile_sm90"  # AOTI: minutes per compile; sm_90 compiles: CI does them
SMOKE_ENV = "DDPM_BENCH_CPU_SMOKE"  # set for a section's process when the check runs without a GPU
CHILD_SECTIONS = ("environment", "driver_probe", "latency", "throughput", "matrix")


def write_json(path, results: dict) -> Path:
    """Write ``results`` as indented JSON (other values as their str) via a temporary file."""
    (tmp := Path(path).with_name(f".{Path(path).name}.tmp")).parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(results, indent=1, default=str))
    return tmp.replace(path)


def run_part(results: dict, name: str, fn, out: Path):
    """results[name] = fn(), or results['errors'][name] = {error, traceback}; its seconds go to
    results['section_seconds'][name], the results to ``out``. Returns fn()'s value or None."""
    t0, value = time.perf_counter(), None
    try:
        value = results[name] = fn()
    except Exception as exc:  # a failing part is recorded; the next one runs
        error = results.setdefault("errors", {})[name] = {"error": f"{type(exc).__name__}: {exc}",
                                                          "traceback": traceback.format_exc()}
        print(f"{name} failed: {error['error']}\n{error['traceback']}", flush=True)
    results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 3)
    write_json(out, results)
    return value


# ---- the sections that run in a child process (python -m bench.gpu_check --section NAME) -----------
def run_child(name: str, work_dir: Path) -> int:
    """Run child section ``name``: each part recorded on its own, the JSON saved after each."""
    path, data = Path(work_dir) / "sections" / f"{name}.json", {}
    try:
        if name in ("environment", "driver_probe"):
            parts = (_environment if name == "environment" else _driver_probe)({})
        else:  # torch and the engine are imported by the measuring sections' processes only
            from bench import measure

            parts = getattr(measure, f"section_{name}")(measure.SMOKE if os.environ.get(SMOKE_ENV) else measure.GPU, {})
        for key, fn in parts:
            print(f"[{time.strftime('%H:%M:%S')}] {name}.{key}", flush=True)
            if (value := run_part(data, key, fn, path)) is not None:
                print(json.dumps(value, default=str)[:2000], flush=True)
    except Exception as exc:  # an import or setup failure outside the parts
        data.setdefault("errors", {})[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        print(data["errors"][name]["traceback"], flush=True)
    write_json(path, data)
    return 1 if data.get("errors") else 0


def _environment(state):
    import torch

    from ddpm_engine.backends import versions as package_versions
    from ddpm_engine.cuda import c_loop
    from ddpm_engine.testing import versions

    def torch_info():
        out = {"cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count()}
        if out["cuda_available"]:
            p = torch.cuda.get_device_properties(0)
            out.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                       sms=p.multi_processor_count)
        return out

    def nvidia_smi():
        query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit,mig.mode.current"
        try:
            return {k: subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30).stdout.strip()
                    for k, args in (("summary", []), ("query", [query, "--format=csv"]))}
        except (OSError, subprocess.SubprocessError) as exc:  # no nvidia-smi: recorded, not an error
            return {"error": f"{type(exc).__name__}: {exc}"}

    yield "versions", lambda: dict(versions(), **package_versions(("triton", "tensorrt")), cuda=torch.version.cuda,
                                   cudnn=torch.backends.cudnn.version(), executable=sys.executable,
                                   platform=platform.platform())
    yield "torch", torch_info
    yield "mapped_cuda_libraries", lambda: {"libcudart": (p := c_loop.mapped_cudart()) and str(p),
                                            "DDPM_CUDART": os.environ.get("DDPM_CUDART")}
    yield "nvidia_smi", nvidia_smi
    yield "ddpm_engine", _installed_tree


def _installed_tree() -> dict:
    """Where ddpm_engine is imported from and whether its sources are this tree's (not a stale wheel)."""
    import importlib

    differs, checked, locations = [], 0, {}
    for package, folder in (("ddpm_engine", "engine"), ("ddpm_engine.kernels", "kernels"), ("ddpm_engine.export", "export")):
        installed = locations[package] = Path(importlib.import_module(package).__file__).resolve().parent
        for f in (f for f in sorted((ROOT / folder).rglob("*")) if f.suffix in (".py", ".c", ".cu", ".h")):
            checked, twin = checked + 1, installed / f.relative_to(ROOT / folder)
            if not twin.is_file() or twin.read_bytes() != f.read_bytes():
                differs.append(str(f.relative_to(ROOT)))
    return {"locations": locations, "files_checked": checked, "matches_tree": not differs, "differs": differs[:30]}


def _driver_probe(state):
    import torch

    if torch.cuda.is_available():
        torch.cuda.init()  # torch's libcudart is mapped now: the graph loop links that one
    from ddpm_engine.cuda import c_loop, graph_loop

    def c_driver():
        state["driver"] = d = c_loop.load_c_loop()
        return {"library": str(d.path), "libcuda": d.libcuda}

    def call(name):
        try:
            return getattr(state["driver"], name)()  # a KeyError: the C driver did not load (errors['c_driver'])
        except c_loop.CudaError as exc:
            if torch.cuda.is_available():
                raise
            return {"unavailable_without_a_gpu": str(exc)}  # expected here: recorded, not an error

    def loop():
        cudart = c_loop.find_cudart()  # before loading: the library maps the libcudart it links
        lib = graph_loop.load_graph_loop()
        needed = subprocess.run(["readelf", "-d", str(lib.path)], capture_output=True, text=True).stdout
        return {"library": str(lib.path), "supported": lib.supported, "arch": graph_loop.cuda_arch(),
                "device_code": graph_loop.embedded_device_code(lib.path), "linked_cudart": str(cudart),
                "links": re.findall(r"\((?:NEEDED|RUNPATH|RPATH)\)\s+.*?\[(.*?)\]", needed)}

    yield "c_driver", c_driver
    yield "driver_version", lambda: call("driver_version")
    yield "device_count", lambda: call("device_count")
    yield "graph_loop", loop


# ---- pytest sections ------------------------------------------------------------------------------
def parse_junit(path: Path) -> dict:
    """Counts, failures (first lines of their messages), skip reasons and recorded properties."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    out = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    out.update(seconds=round(sum(float(s.get("time", 0)) for s in suites), 2), failed=[], skip_reasons=Counter(),
               properties={})
    for case in root.iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        out["failed"] += [{"test": test, "kind": n.tag, "message": (n.get("message") or n.text or "").strip()[:600]}
                          for n in case.findall("failure") + case.findall("error")]
        out["skip_reasons"].update((n.get("message") or "").strip()[:300] for n in case.findall("skipped"))
        if recorded := {p.get("name"): p.get("value") for p in case.iter("property")}:
            out["properties"][test] = recorded
    return out


def parse_pytest_log(text: str) -> dict:
    """Per-outcome counts and the failed tests from ``pytest -v`` output (for a run cut short)."""
    found = [m.groups() for m in map(re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b").match,
                                     text.splitlines()) if m]
    return {"counts_from_log": dict(Counter(o for _, o in found)), "failed": [t for t, o in found if o in ("FAILED", "ERROR")]}


# ---- the orchestrating parent -------------------------------------------------------------------
@dataclass
class Section:
    """``argv(work_dir)``: its command, run from the repository root; ``collect(work_dir, output)``:
    the JSON's ``data`` from what it left. Without a GPU a ``needs_gpu`` section is skipped, or run
    at the smoke scale when it ``smokes``."""

    name: str
    budget_s: float
    needs_gpu: bool
    argv: Callable[[Path], list]
    collect: Callable[[Path, str], dict] | None = None
    smokes: bool = False


def pytest_section(name: str, folder: str, budget_s: float, tests_k: str | None) -> Section:
    junit = lambda work_dir: Path(work_dir) / "junit" / f"{name}.xml"  # noqa: E731

    def argv(work_dir) -> list:
        return [sys.executable, "-m", "pytest", "-m", "gpu or not gpu", folder, "-v", "-rfEs", "--tb=short",
                "--durations=10", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
                f"--junitxml={junit(work_dir)}"] + (["-k", tests_k] if tests_k else [])

    def collect(work_dir, output: str) -> dict:
        data = parse_junit(junit(work_dir)) if junit(work_dir).is_file() else parse_pytest_log(output)
        return dict(data, command=shlex.join(argv(work_dir)[1:]))

    return Section(name, budget_s, True, argv, collect)


def child_section(name: str, budget_s: float, needs_gpu: bool) -> Section:
    def collect(work_dir, output: str) -> dict:
        path = Path(work_dir) / "sections" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    argv = lambda work_dir: [sys.executable, "-m", "bench.gpu_check", "--section", name, "--work", str(work_dir)]  # noqa: E731
    return Section(name, budget_s, needs_gpu, argv, collect, smokes=needs_gpu)


def default_sections(tests_k: str | None = DEFAULT_TESTS_K) -> list[Section]:
    """The one command's sections with their budgets (seconds; they sum to TOTAL_BUDGET_S)."""
    return [child_section("environment", 30, False), child_section("driver_probe", 30, False),
            pytest_section("tests_engine_cuda", "tests/engine/cuda", 50, tests_k),
            pytest_section("tests_kernels", "tests/kernels", 80, tests_k),
            pytest_section("tests_gpu", "tests/gpu", 115, tests_k),
            child_section("latency", 95, True), child_section("throughput", 60, True)]


def later_sections() -> list[Section]:
    """The full bench, run only when named in --only."""
    return [child_section("matrix", 520, True)]


class Stopped(Exception):
    """SIGTERM (the device command's ``timeout``): the running section was killed, the JSON written."""


def _run(section: Section, work_dir: Path, timeout: float, log, progress, smoke: bool = False) -> dict:
    """Run one section, its output appended to the open gpu_check.log ``log``; every POLL_S seconds
    ``progress(record)`` sees what it has collected so far."""
    t0, argv = time.perf_counter(), section.argv(work_dir)
    record = {"budget_s": round(timeout, 1), "command": shlex.join(map(str, argv)), "status": "running"}
    log.write(f"----- {section.name} output -----\n")
    log.flush()
    begin = log.tell()

    def collect() -> str:
        """The section's output so far; its data and seconds into ``record``."""
        log.flush()
        with open(log.name, errors="replace") as f:
            f.seek(begin)
            output = f.read()
        record["seconds"] = round(time.perf_counter() - t0, 2)
        try:
            if section.collect is not None:
                record["data"] = section.collect(work_dir, output)
        except Exception as exc:  # e.g. a half-written junit file
            record["collect_error"] = f"{type(exc).__name__}: {exc}"
        return output

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # kernels compile for the GPU
    env.setdefault("DDPM_ENGINE_CACHE", str(Path(tempfile.gettempdir()) / "ddpm-engine-gpu-check"))
    env.update(PYTHONUNBUFFERED="1", **({SMOKE_ENV: "1"} if smoke else {}))
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
    except OSError as exc:
        return dict(record, status="failed", error=f"could not start: {exc}", seconds=0.0)
    try:
        while record["status"] == "running":
            try:
                rc = proc.wait(timeout=max(0.1, min(POLL_S, timeout - (time.perf_counter() - t0))))
                record.update(status="ok" if rc == 0 else "failed", rc=rc)
            except subprocess.TimeoutExpired:
                if time.perf_counter() - t0 >= timeout:
                    record.update(status="timeout", rc=None, error=f"stopped after its budget of {timeout:.0f} s")
                else:
                    collect()
                    progress(record)
    except Stopped:
        record.update(status="killed", rc=None, error="the check was stopped (SIGTERM) while this section ran")
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the section's own process group: it and its children
            proc.wait()
        output = collect()
        if record["status"] != "ok":
            record.setdefault("error", f"exit code {record.get('rc')}")
            record["output_tail"] = "\n".join(output.splitlines()[-40:])
        log.write(f"\n----- end {section.name} -----\n")
        log.flush()
    return record
def run_sections(sections: list[Section], out_dir, total_budget_s: float = TOTAL_BUDGET_S, gpu: bool | None = None,
                 mode_note: str = "", echo=print, work_dir=None) -> dict:
    """Run ``sections`` in order, each in its own process with min(its budget, the time left).
    out_dir gets gpu_check.json (after each section and every POLL_S seconds) and gpu_check.log,
    nothing else; junit files and the children's JSON go to ``work_dir`` (default: a temporary
    folder). On SIGTERM the running section is killed and recorded. ``gpu=None``: the environment
    section's torch.cuda.is_available() decides."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="ddpm-gpu-check-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    json_path, log_path, start = out_dir / "gpu_check.json", out_dir / "gpu_check.log", time.perf_counter()
    results = {"tool": "bench.gpu_check", "started": datetime.datetime.now().isoformat(timespec="seconds"),
               "total_budget_s": total_budget_s, "gpu": gpu, "sections": {}, "summary": {}}

    def save(name=None, record=None):
        if name is not None:
            results["sections"][name], results["summary"][name] = record, record["status"]
        results["mode"] = None if gpu is None else "gpu" if gpu else f"cpu-smoke ({mode_note or 'no GPU'})"
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        results["measured"] = measured(results)
        write_json(json_path, results)

    def stop(signum, frame):
        raise Stopped()

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    with open(log_path, "a") as log:
        def say(msg):
            line = f"[{time.strftime('%H:%M:%S')}] {msg}"
            echo(line, flush=True)
            log.write(line + "\n")
            log.flush()

        try:
            for section in sections:
                left = total_budget_s - (time.perf_counter() - start)
                if section.needs_gpu and gpu is None:
                    gpu = results["gpu"] = _gpu_from(results)
                if section.needs_gpu and not gpu and not section.smokes:
                    record = {"status": "skipped", "reason": "needs a CUDA GPU: " + (mode_note or "none here")}
                elif left < MIN_SECTION_S:
                    record = {"status": "skipped", "reason": f"out of time: {left:.0f} s of the {total_budget_s} s "
                                                             "total budget left"}
                else:
                    say(f"section {section.name}: start (budget {min(section.budget_s, left):.0f} s)")
                    try:
                        record = _run(section, work_dir, min(section.budget_s, left), log,
                                      lambda r, n=section.name: save(n, r), smoke=section.needs_gpu and not gpu)
                    except Stopped:
                        save(section.name, results["sections"].get(section.name, {"status": "killed"}))
                        raise
                save(section.name, record)
                say(f"section {section.name}: {record['status']}"
                    + (f" in {record['seconds']} s" if "seconds" in record else f" ({record.get('reason')})")
                    + (f": {record['error']}" if record.get("error") else ""))
        except Stopped:
            results["stopped"] = "SIGTERM: the sections after the killed one did not run"
            say(results["stopped"])
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        save()
        for line in headline_lines(results) + [f"wrote {json_path} and {log_path}: " + json.dumps(results["summary"])]:
            say(line)
    return results


def measured(results: dict) -> dict:
    """What the sections measured, gathered for bench/report.py: device, versions, rows by kind,
    host_us_per_step, flops_per_image_step, matmul_peak_tflops."""
    data = {name: record.get("data") or {} for name, record in results.get("sections", {}).items()}
    env, tput = data.get("environment", {}), data.get("throughput", {})
    out = {"device": next((d["model"]["device"] for d in data.values() if isinstance(d.get("model"), dict)
                           and "device" in d["model"]), (env.get("torch") or {}).get("device")),
           "versions": env.get("versions"), "host_us_per_step": data.get("latency", {}).get("host_us_per_step"),
           "flops_per_image_step": {"cifar10": f} if (f := (tput.get("model") or {}).get("flops_per_image_step")) else None,
           "matmul_peak_tflops": tput.get("matmul_peak_tflops_bf16"), "latency": [], "throughput": [], "peers": [],
           "parity": []}
    for section, parts in data.items():
        for part, value in parts.items():
            for row in value if isinstance(value, list) else [value]:
                if isinstance(row, dict) and row.get("kind") in ("latency", "throughput", "peers", "parity"):
                    out[row["kind"]].append(dict(row, section=f"{section}.{part}"))
    parity = {}  # the GPU parity tests record eps_rel_err, image_max_abs and psnr_db per model/backend/precision
    for test, props in data.get("tests_gpu", {}).get("properties", {}).items():
        if m := re.search(r"matches_eager_fp32\[(\w+)-(\w+)-(\w+)\]$", test):
            row = parity.setdefault(m.groups(), dict(zip(("model", "backend", "precision"), m.groups()), kind="parity",
                                                     driver="auto", section="tests_gpu"))
            row.update({k: float(v) for k, v in props.items()})
    out["parity"] += parity.values()
    return out


def headline_lines(results: dict) -> list[str]:
    """The headline numbers as short lines (the device reply shows the end of the output)."""
    m = results.get("measured") or measured(results)
    ours = lambda kind, section: [r for r in m[kind] if r["section"].startswith(section)]  # noqa: E731
    lines = [f"latency b1 {r['sampler']}-{r['steps']} {r['precision']} {r['driver']}: {r['seconds']:.3f} s"
             for r in ours("latency", "latency.")]
    lines += [f"peer {r['name']} b{r['batch']} {r['precision']}: {r['seconds']:.3f} s per {r['steps']} steps"
              for r in ours("peers", "latency.")]
    lines += [f"throughput b{r['batch']} {r['precision']} ({r['driver']}): {r['images_per_s']:.1f} images/s"
              for r in ours("throughput", "throughput.")]
    if isinstance(m["matmul_peak_tflops"], (int, float)):
        lines.append(f"bf16 matmul peak: {m['matmul_peak_tflops']:.0f} TFLOP/s")
    host = {k: v for k, v in (m["host_us_per_step"] or {}).items() if isinstance(v, (int, float))}
    return lines + (["host us per step: " + ", ".join(f"{k} {v:.1f}" for k, v in host.items())] if host else [])


def failed_sections(results: dict) -> list[str]:
    """The sections of a gpu_check.json that did not end ok (skipped for want of a GPU excepted)."""
    return [name for name, record in results.get("sections", {}).items()
            if record.get("status") not in ("ok", "skipped") or str(record.get("reason", "")).startswith("out of time")]


def _gpu_from(results: dict) -> bool:
    """torch.cuda.is_available() as the environment section saw it, else asked in a fresh process."""
    seen = (results["sections"].get("environment", {}).get("data", {}).get("torch") or {}).get("cuda_available")
    if seen is not None:
        return bool(seen)
    try:
        return subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120).stdout.strip().endswith("True")
    except (OSError, subprocess.SubprocessError):
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for gpu_check.json and gpu_check.log (nothing else is written there)")
    ap.add_argument("--work", help="folder for the junit files and the sections' JSON (default: a temporary one)")
    ap.add_argument("--cpu-smoke", action="store_true", help="skip the test sections, run the measuring ones small "
                    "on the CPU (automatic when torch sees no CUDA device)")
    ap.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="total time budget in seconds")
    ap.add_argument("--only", help="comma-separated sections to run (the full bench's run only when named)")
    ap.add_argument("--failed-in", metavar="JSON", help="print the --only value that reruns this gpu_check.json's "
                    "sections that did not end ok, and exit")
    ap.add_argument("--tests-k", default=DEFAULT_TESTS_K, help="pytest -k for the test sections ('' for all)")
    ap.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one child section
    args = ap.parse_args(argv)
    if args.failed_in is not None:
        print(",".join(failed_sections(json.loads(Path(args.failed_in).read_text()))))
        return 0
    if args.section is not None:
        if args.section not in CHILD_SECTIONS or args.work is None:
            ap.error(f"--section takes --work and one of {sorted(CHILD_SECTIONS)}")
        return run_child(args.section, Path(args.work))
    if args.out is None:
        ap.error("--out is required")
    sections = default_sections(args.tests_k or None)
    if args.only:
        every, wanted = sections + later_sections(), {s.strip() for s in args.only.split(",") if s.strip()}
        if unknown := wanted - {s.name for s in every}:
            ap.error(f"unknown sections {sorted(unknown)}; choose from {[s.name for s in every]}")
        sections = [s for s in every if s.name in wanted]
    note = "--cpu-smoke given" if args.cpu_smoke else "torch.cuda.is_available() is False"
    results = run_sections(sections, Path(args.out), args.budget_s, False if args.cpu_smoke else None, note,
                           work_dir=args.work)
    return 0 if all(v in ("ok", "skipped") for v in results["summary"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
