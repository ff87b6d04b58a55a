"""One-call GPU verification and the headline numbers, in <= 8 minutes (one device call of 8.5).

    python -m bench.gpu_check --out DIR                # on the GPU machine (see README, "GPU verification")
    python -m bench.gpu_check --out DIR --cpu-smoke    # anywhere: the sections that need no GPU
    python -m bench.gpu_check --failed-in gpu_check.json   # here: the --only value of a warm rerun

Writes DIR/gpu_check.json and DIR/gpu_check.log and nothing else into DIR (a device call returns
at most 8 files): the log gets every section's output as it comes, the JSON is rewritten after
each section and every POLL_S seconds while one runs, so a call cut short (``timeout``, SIGTERM:
the running section is killed and recorded as "killed") still returns what was measured. Junit
files and the sections' own JSON go to --work (default: a temporary folder). Every section runs in
its own process with its own time budget, inside a total budget (default 460 s): a crash, a hang
or a CUDA error in one section is recorded (status, exit code, the tail of its output) and the
next one runs; a section that would start after the total budget is spent is skipped. Without
CUDA (or with --cpu-smoke) the GPU sections are recorded as skipped with the reason.

Sections:
- environment: Python/torch/CUDA/cuDNN/triton/onnxruntime/diffusers versions, the GPU, nvidia-smi,
  the CUDA libraries the process mapped (libcudart from /proc/self/maps), whether `import
  tensorrt` works, which of diffusers' and pytest's dependencies import, and whether the
  installed ddpm_engine matches this tree (a stale wheel would test old code).
- driver_probe: builds the C driver and the graph loop (engine/cuda), the CUDA driver's version,
  the device count, the graph loop's embedded device code and the libcudart it links.
- tests_engine_cuda, tests_kernels, tests_gpu: `pytest -m "gpu or not gpu" <folder>` with
  TRITON_INTERPRET unset; AOTI cases and the sm_90 compile test (CI runs it) are deselected
  (`--tests-k`). Counts, failures, skip reasons and recorded properties (eps_rel_err, psnr_db)
  from the junit XML, or from the verbose log if the budget ran out.
- latency: the CIFAR-10 UNet (random weights), fp32 with TF32 off, batch 1, DDPM-1000 in full per
  driver (eager, Python graph replay, the C driver, the graph loop, and the default path "auto"),
  each driver a part of its own (bench.gpu_suite.latency_rows: the graph drivers replay a sampler
  captured before the timing); the engine's ``fast_path()`` report; diffusers' DDPMPipeline fp32.
- throughput: the bf16 matmul peak, then images/s at 1000 DDPM steps at batch 256, fp32 and
  bf16, with the fastest driver that runs (C driver, else Python replay, else eager), from runs
  of THROUGHPUT_STEPS steps (bench.gpu_suite.time_drivers).
The full benchmark (peers under torch.compile, every precision and batch) is bench/gpu_suite.py:
an optional, later call.
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
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.sections import error_record, run_section, write_json

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 460  # the device command allows 480 (timeout), plus the install: 8.5 minutes
MIN_SECTION_S = 5  # a section with less time than this left is skipped
TAIL_LINES = 40
DEFAULT_TESTS_K = "not aoti and not compile_sm90"  # AOTI: minutes per compile; sm_90 compiles: CI does them
HEADLINE_STEPS = 1000  # DDPM-1000
LATENCY_DRIVERS = ("eager", "python_graph", "c_driver", "graph_loop", "auto")  # bench.gpu_suite's driver names
THROUGHPUT_DRIVERS = ("c_driver", "python_graph", "eager")  # fastest first
THROUGHPUT_BATCH = 256
THROUGHPUT_STEPS = 50  # steps timed per throughput run (every DDPM step does the same device work)
POLL_S = 2.0  # how often a running section's partial results are copied into gpu_check.json
MODULES = ("torch", "triton", "onnxruntime", "onnx", "diffusers", "numpy", "pytest", "huggingface_hub",
           "safetensors", "importlib_metadata", "zipp", "regex", "requests", "PIL", "filelock", "tqdm",
           "pluggy", "iniconfig", "packaging", "pygments", "cupy", "cuda", "tensorrt")


@dataclass
class Section:
    """One step of the check: ``argv(work_dir)`` is its command, run from the repository root;
    ``collect(work_dir, output)`` turns what it left behind (and its output so far) into the
    JSON's ``data``."""

    name: str
    budget_s: float
    needs_gpu: bool
    argv: Callable[[Path], list]
    collect: Callable[[Path, str], dict] | None = None


# ---- the sections that run inside a child process (python -m bench.gpu_check --section NAME) ------
def _section_json(work_dir: Path, name: str) -> Path:
    return Path(work_dir) / "sections" / f"{name}.json"


def _environment(data):
    import torch

    def python():
        return {"version": platform.python_version(), "executable": sys.executable, "platform": platform.platform()}

    def torch_info():
        info = {"version": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count()}
        if torch.cuda.is_available():
            torch.cuda.init()
            props = torch.cuda.get_device_properties(0)
            info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                        memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
        return info

    yield "python", python
    yield "torch", torch_info
    yield "modules", lambda: {m: _module_version(m) for m in MODULES}
    yield "tensorrt", _tensorrt_import
    yield "mapped_cuda_libraries", _mapped_cuda_libraries
    yield "nvidia_smi", _nvidia_smi
    yield "ddpm_engine", _installed_tree


def _module_version(name: str) -> str:
    import importlib
    import importlib.metadata

    try:
        module = importlib.import_module(name)
    except Exception as exc:  # absent or broken: say which
        return f"NOT IMPORTABLE: {type(exc).__name__}: {exc}"
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version({"PIL": "pillow", "cuda": "cuda-python"}.get(name, name))
        except importlib.metadata.PackageNotFoundError:
            version = "imported (version unknown)"
    return str(version)


def _tensorrt_import() -> dict:
    try:
        import tensorrt
    except Exception as exc:  # absent on the GPU image so far: recorded, not fatal
        return {"importable": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"importable": True, "version": getattr(tensorrt, "__version__", None)}


def _mapped_cuda_libraries() -> dict:
    from ddpm_engine.cuda import driver

    pattern = re.compile(r"lib(cudart|cuda|cudnn[a-z_]*|cublas(Lt)?|nvrtc|nvJitLink|nccl)\.so[.\d]*$")
    paths = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and pattern.search(Path(parts[5]).name) and parts[5] not in paths:
            paths.append(parts[5])
    cudart = driver.mapped_cudart()
    return {"libcudart": str(cudart) if cudart else None, "DDPM_CUDART": os.environ.get("DDPM_CUDART"),
            "all": paths}


def _nvidia_smi() -> dict:
    out = {}
    for key, cmd in (("summary", ["nvidia-smi"]),
                     ("query", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                "power.limit,persistence_mode,mig.mode.current", "--format=csv"])):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            out[key] = proc.stdout.strip() or proc.stderr.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            out[key] = f"{type(exc).__name__}: {exc}"
    return out


def _installed_tree() -> dict:
    """Where ddpm_engine is imported from and whether its sources are this tree's."""
    import importlib

    differs, checked, locations = [], 0, {}
    for package, folder in (("ddpm_engine", "engine"), ("ddpm_engine.kernels", "kernels"),
                            ("ddpm_engine.export", "export")):
        installed = Path(importlib.import_module(package).__file__).resolve().parent
        locations[package] = str(installed)
        src = ROOT / folder
        for f in sorted(src.rglob("*")):
            if f.suffix not in (".py", ".c", ".cu", ".h") or "__pycache__" in f.parts:
                continue
            checked += 1
            twin = installed / f.relative_to(src)
            if not twin.is_file() or twin.read_bytes() != f.read_bytes():
                differs.append(str(f.relative_to(ROOT)))
    return {"locations": locations, "files_checked": checked, "matches_tree": not differs, "differs": differs[:30]}


def _driver_probe(data):
    import torch

    if torch.cuda.is_available():
        torch.cuda.init()  # torch's libcudart is mapped now: the graph loop links that one
    from ddpm_engine.cuda import driver, graph_loop

    state = {}

    def c_driver():
        state["driver"] = d = driver.load_driver()
        return {"library": str(d.path), "libcuda": d.libcuda}

    def call(name):
        d = state.get("driver")
        if d is None:
            raise RuntimeError("the C driver did not load (see errors['c_driver'])")
        try:
            return getattr(d, name)()
        except driver.CudaError as exc:
            if torch.cuda.is_available():
                raise
            return {"unavailable_without_a_gpu": str(exc)}  # expected here: recorded, not an error

    def loop():
        cudart = driver.find_cudart()  # before loading: the library maps the libcudart it links
        lib = graph_loop.load_graph_loop()
        needed = subprocess.run(["readelf", "-d", str(lib.path)], capture_output=True, text=True).stdout
        return {"library": str(lib.path), "supported": lib.supported, "arch": graph_loop.cuda_arch(),
                "device_code": graph_loop.embedded_device_code(lib.path),
                "links": re.findall(r"\((?:NEEDED|RUNPATH|RPATH)\)\s+.*?\[(.*?)\]", needed),
                "linked_cudart": str(cudart)}

    yield "c_driver", c_driver
    yield "driver_version", lambda: call("driver_version")
    yield "device_count", lambda: call("device_count")
    yield "graph_loop", loop


def _latency(data):
    """Batch-1 DDPM-1000 on the CIFAR-10 UNet, fp32 (TF32 off), each driver as its own part."""
    import torch

    from bench import gpu_suite as suite

    state = {}

    def model():
        state["loaded"] = suite.cifar_loaded(seed=0)
        return {"model": "CIFAR-10 UNet (diffusers UNet2DModel, random weights), 3x32x32", "device":
                torch.cuda.get_device_name(), "precision": "fp32 (TF32 off)", "backend": "torch"}

    def driver_row(driver):
        notes = []
        matrix = suite.Matrix(latency=(("ddpm", HEADLINE_STEPS),))
        rows = suite.latency_rows(state["loaded"], "cifar10", "torch", "fp32", "cuda", matrix, (driver,), notes=notes)
        if not rows:
            raise RuntimeError("; ".join(notes) or f"{driver} gave no row")
        return dict(rows[0], notes=notes) if notes else rows[0]

    def fast_path():
        with suite.math_mode("fp32"):
            eng = suite.make_engine(state["loaded"], "torch", "fp32", "cuda", batching=False)  # asks for the C driver
            try:
                eng.sample([1], sampler="ddpm", steps=HEADLINE_STEPS)  # the default path, once
                return eng.fast_path()
            finally:
                eng.close()

    def diffusers_fp32():
        notes = []
        rows = suite.diffusers_peer_rows(state["loaded"], "cifar10", "cuda", 1, HEADLINE_STEPS, HEADLINE_STEPS,
                                         precisions=("fp32",), notes=notes)
        if not rows:
            raise RuntimeError("; ".join(notes) or "the DDPMPipeline peer gave no row")
        return rows[0]

    yield "model", model
    for driver in LATENCY_DRIVERS:
        yield driver, lambda d=driver: driver_row(d)
    yield "fast_path", fast_path
    yield "diffusers_ddpm_pipeline_fp32", diffusers_fp32


def _throughput(data):
    """images/s at 1000 DDPM steps, batch 256, fp32 and bf16, with the fastest driver that runs
    (the C driver, else Python graph replay, else eager), from runs of THROUGHPUT_STEPS steps;
    and the bf16 matmul peak (the roofline's denominator)."""
    from bench import gpu_suite as suite

    state = {}

    def model():
        state["loaded"] = suite.cifar_loaded(seed=0)
        return {"flops_per_image_step": suite.flops_per_image_step(state["loaded"])}

    def rate(mode):
        notes = []
        with suite.math_mode(mode):
            eng = suite.make_engine(state["loaded"], "torch", suite.engine_precision(mode), "cuda")
            try:
                for driver in THROUGHPUT_DRIVERS:  # fastest first; the first that runs is the row
                    times = suite.time_drivers(eng, "ddpm", THROUGHPUT_STEPS, THROUGHPUT_BATCH, [driver], "cuda", 3,
                                               True, f"throughput {mode}", notes, print)
                    if driver in times:
                        per_step = times[driver] / THROUGHPUT_STEPS
                        return {"precision": mode, "driver": driver, "batch": THROUGHPUT_BATCH,
                                "steps": HEADLINE_STEPS, "steps_measured": THROUGHPUT_STEPS,
                                "seconds_per_step": per_step,
                                "images_per_s": THROUGHPUT_BATCH / (per_step * HEADLINE_STEPS), "notes": notes}
            finally:
                eng.close()
                suite.free("cuda")
        raise RuntimeError("no driver ran: " + "; ".join(notes))

    yield "matmul_peak_tflops_bf16", lambda: suite.matmul_peak_tflops("cuda")
    yield "model", model
    for mode in ("fp32", "bf16"):
        yield f"b{THROUGHPUT_BATCH}_{mode}", lambda m=mode: rate(m)


CHILD_SECTIONS = {"environment": _environment, "driver_probe": _driver_probe, "latency": _latency,
                  "throughput": _throughput}


def run_child(name: str, work_dir: Path) -> int:
    """Run child section ``name``: each of its parts recorded on its own, the JSON saved after each."""
    path = _section_json(work_dir, name)
    data: dict = {}

    def log(msg):
        print(msg, flush=True)

    try:
        for key, fn in CHILD_SECTIONS[name](data):
            log(f"[{time.strftime('%H:%M:%S')}] {name}.{key}")
            value = run_section(data, key, fn, log, out=path)
            if value is not None:
                log(json.dumps(value, default=str)[:2000])
    except Exception as exc:  # an import or setup failure outside the parts
        data.setdefault("errors", {})[name] = error_record(exc)
        log(data["errors"][name]["traceback"])
    write_json(path, data)
    return 1 if data.get("errors") else 0


# ---- pytest sections ------------------------------------------------------------------------------
def parse_junit(path: Path) -> dict:
    """Counts, failures (first lines of their messages), skip reasons and recorded properties."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    out = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    out["seconds"] = round(sum(float(s.get("time", 0)) for s in suites), 2)
    failed, skips, props = [], {}, {}
    for case in root.iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        for tag in ("failure", "error"):
            for node in case.findall(tag):
                message = (node.get("message") or node.text or "").strip()
                failed.append({"test": test, "kind": tag, "message": message[:600]})
        for node in case.findall("skipped"):
            reason = (node.get("message") or "").strip()[:300]
            skips[reason] = skips.get(reason, 0) + 1
        recorded = {p.get("name"): p.get("value") for p in case.iter("property")}
        if recorded:
            props[test] = recorded
    out.update(failed=failed, skip_reasons=skips, properties=props)
    return out


_RESULT_LINE = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def parse_pytest_log(text: str) -> dict:
    """Per-outcome counts and the failed tests from ``pytest -v`` output (for a run cut short)."""
    counts, failed = {}, []
    for line in text.splitlines():
        m = _RESULT_LINE.match(line)
        if m:
            counts[m.group(2)] = counts.get(m.group(2), 0) + 1
            if m.group(2) in ("FAILED", "ERROR"):
                failed.append(m.group(1))
    return {"counts_from_log": counts, "failed": failed}


def pytest_section(name: str, folder: str, budget_s: float, tests_k: str | None) -> Section:
    def junit(work_dir: Path) -> Path:
        return Path(work_dir) / "junit" / f"{name}.xml"

    def argv(work_dir: Path) -> list:
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu or not gpu", folder, "-v", "-rfEs", "--tb=short",
               "--durations=10", "-p", "no:cacheprovider", "-o", "junit_family=xunit1", f"--junitxml={junit(work_dir)}"]
        return cmd + (["-k", tests_k] if tests_k else [])

    def collect(work_dir: Path, output: str) -> dict:
        data = parse_junit(junit(work_dir)) if junit(work_dir).is_file() else parse_pytest_log(output)
        data["command"] = shlex.join(argv(work_dir)[1:])
        return data

    return Section(name, budget_s, True, argv, collect)


def child_section(name: str, budget_s: float, needs_gpu: bool) -> Section:
    def collect(work_dir: Path, output: str) -> dict:
        path = _section_json(work_dir, name)
        return json.loads(path.read_text()) if path.is_file() else {}

    return Section(name, budget_s, needs_gpu,
                   lambda work_dir: [sys.executable, "-m", "bench.gpu_check", "--section", name, "--work",
                                     str(work_dir)],
                   collect)


def default_sections(tests_k: str | None = DEFAULT_TESTS_K) -> list[Section]:
    """The check's sections with their budgets (seconds; they sum to TOTAL_BUDGET_S)."""
    return [
        child_section("environment", 30, needs_gpu=False),
        child_section("driver_probe", 30, needs_gpu=False),
        pytest_section("tests_engine_cuda", "tests/engine/cuda", 50, tests_k),
        pytest_section("tests_kernels", "tests/kernels", 80, tests_k),
        pytest_section("tests_gpu", "tests/gpu", 115, tests_k),
        child_section("latency", 95, needs_gpu=True),
        child_section("throughput", 60, needs_gpu=True),
    ]


# ---- the orchestrating parent -------------------------------------------------------------------
def _tail(text: str, n: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-n:])


def _child_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # kernels compile for the GPU, not the interpreter
    env.setdefault("DDPM_ENGINE_CACHE", str(Path(tempfile.gettempdir()) / "ddpm-engine-gpu-check"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Stopped(Exception):
    """SIGTERM (the device command's ``timeout``): the running section was killed, the JSON written."""


def _run(section: Section, work_dir: Path, timeout: float, log, progress) -> dict:
    """Run one section with its output appended to the open gpu_check.log ``log``; every POLL_S
    seconds ``progress(partial record)`` sees what it has collected so far."""
    t0 = time.perf_counter()
    argv = section.argv(work_dir)
    record = {"budget_s": round(timeout, 1), "command": shlex.join(map(str, argv)), "status": "running"}
    log.write(f"----- {section.name} output -----\n")
    log.flush()
    begin = log.tell()

    def output() -> str:
        log.flush()
        with open(log.name, errors="replace") as f:
            f.seek(begin)
            return f.read()

    def collect():
        if section.collect is not None:
            try:
                record["data"] = section.collect(work_dir, output())
            except Exception as exc:  # e.g. a half-written junit file
                record["collect_error"] = f"{type(exc).__name__}: {exc}"

    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=_child_env(),
                                start_new_session=True)
    except OSError as exc:
        return dict(record, status="failed", error=f"could not start: {exc}", seconds=0.0)
    try:
        while True:
            try:
                rc = proc.wait(timeout=max(0.1, min(POLL_S, timeout - (time.perf_counter() - t0))))
                record.update(status="ok" if rc == 0 else "failed", rc=rc)
                break
            except subprocess.TimeoutExpired:
                if time.perf_counter() - t0 >= timeout:
                    record.update(status="timeout", rc=None, error=f"stopped after its budget of {timeout:.0f} s")
                    break
                collect()
                record["seconds"] = round(time.perf_counter() - t0, 2)
                progress(record)
    except Stopped:
        record.update(status="killed", rc=None, error="the check was stopped (SIGTERM) while this section ran")
        raise
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the section's own process group: it and its children
            proc.wait()
        record["seconds"] = round(time.perf_counter() - t0, 2)
        collect()
        if record["status"] != "ok":
            record.setdefault("error", f"exit code {record.get('rc')}")
            record["output_tail"] = _tail(output())
        log.write(f"\n----- end {section.name} -----\n")
        log.flush()
    return record


def run_sections(sections: list[Section], out_dir, total_budget_s: float = TOTAL_BUDGET_S, gpu: bool | None = None,
                 mode_note: str = "", echo=print, work_dir=None) -> dict:
    """Run ``sections`` in order, each in its own process with min(its budget, the time left);
    write out_dir/gpu_check.json after each (and every POLL_S seconds while one runs) and every
    section's output to out_dir/gpu_check.log as it comes: those two files, nothing else, go to
    ``out_dir``; junit files and the children's JSON go to ``work_dir`` (default: a temporary
    folder). On SIGTERM the running section is killed and recorded as such, and the JSON written.
    ``gpu=None``: decided after the environment section (torch.cuda.is_available() there)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="ddpm-gpu-check-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    json_path, log_path = out_dir / "gpu_check.json", out_dir / "gpu_check.log"
    start = time.perf_counter()
    results = {"tool": "bench.gpu_check", "started": datetime.datetime.now().isoformat(timespec="seconds"),
               "total_budget_s": total_budget_s, "gpu": gpu, "sections": {}, "summary": {}}

    def set_mode():
        results["mode"] = None if gpu is None else "gpu" if gpu else f"cpu-smoke ({mode_note or 'no GPU'})"

    def save(name=None, record=None):
        if name is not None:
            results["sections"][name] = record
            results["summary"][name] = record["status"]
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        write_json(json_path, results)

    def stop(signum, frame):
        raise Stopped()

    set_mode()
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
                    set_mode()
                if section.needs_gpu and not gpu:
                    record = {"status": "skipped", "reason": "needs a CUDA GPU: " + (mode_note or "none here")}
                elif left < MIN_SECTION_S:
                    record = {"status": "skipped", "reason": f"out of time: {left:.0f} s of the {total_budget_s} s "
                                                             "total budget left"}
                else:
                    budget = min(section.budget_s, left)
                    say(f"section {section.name}: start (budget {budget:.0f} s)")
                    try:
                        record = _run(section, work_dir, budget, log, lambda r, n=section.name: save(n, r))
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
        for line in headline_lines(results):
            say(line)
        say(f"wrote {json_path} and {log_path}: " + json.dumps(results["summary"]))
    return results


def headline_lines(results: dict) -> list[str]:
    """The headline numbers as short lines (the device reply shows the end of the output)."""
    lines = []
    latency = results["sections"].get("latency", {}).get("data", {})
    for key in (*LATENCY_DRIVERS, "diffusers_ddpm_pipeline_fp32"):
        if isinstance(latency.get(key), dict) and "seconds" in latency[key]:
            lines.append(f"latency b1 DDPM-{HEADLINE_STEPS} fp32 {key}: {latency[key]['seconds']:.3f} s")
    throughput = results["sections"].get("throughput", {}).get("data", {})
    for key, value in throughput.items():
        if isinstance(value, dict) and "images_per_s" in value:
            lines.append(f"throughput {key} ({value['driver']}): {value['images_per_s']:.1f} images/s")
    if isinstance(throughput.get("matmul_peak_tflops_bf16"), (int, float)):
        lines.append(f"bf16 matmul peak: {throughput['matmul_peak_tflops_bf16']:.0f} TFLOP/s")
    return lines


def failed_sections(results: dict) -> list[str]:
    """The sections of a gpu_check.json that did not end ok (skipped for want of a GPU excepted)."""
    return [name for name, record in results.get("sections", {}).items()
            if record.get("status") not in ("ok", "skipped") or str(record.get("reason", "")).startswith("out of time")]


def _gpu_from(results: dict) -> bool:
    """torch.cuda.is_available() as the environment section saw it, else asked in a fresh process."""
    torch_info = results["sections"].get("environment", {}).get("data", {}).get("torch")
    if isinstance(torch_info, dict) and "cuda_available" in torch_info:
        return bool(torch_info["cuda_available"])
    try:
        proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.stdout.strip().endswith("True")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for gpu_check.json and gpu_check.log (nothing else is written there)")
    ap.add_argument("--work", default=None, help="folder for the junit files and the sections' own JSON "
                                                 "(default: a new temporary folder)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run only the sections that need no GPU (automatic when torch sees no CUDA device)")
    ap.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="total time budget in seconds")
    ap.add_argument("--only", default=None, help="comma-separated section names to run (default: all)")
    ap.add_argument("--failed-in", default=None, metavar="JSON",
                    help="print the --only value that reruns the sections of this gpu_check.json that did not "
                         "end ok, and exit")
    ap.add_argument("--tests-k", default=DEFAULT_TESTS_K, help="pytest -k expression for the test sections "
                    "('' for all, e.g. to include the AOTI cases)")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one child section
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
        wanted = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = wanted - {s.name for s in sections}
        if unknown:
            ap.error(f"unknown sections {sorted(unknown)}; choose from {[s.name for s in sections]}")
        sections = [s for s in sections if s.name in wanted]
    gpu = False if args.cpu_smoke else None
    note = "--cpu-smoke given" if args.cpu_smoke else "torch.cuda.is_available() is False"
    results = run_sections(sections, Path(args.out), args.budget_s, gpu, note, work_dir=args.work)
    return 0 if all(v in ("ok", "skipped") for v in results["summary"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
