"""One-call GPU verification: versions, a driver probe, the GPU tests and a quick timing, in <= 8 minutes.

    python -m bench.gpu_check --out DIR                # on the GPU machine (see README, "GPU verification")
    python -m bench.gpu_check --out DIR --cpu-smoke    # anywhere: the sections that need no GPU

Writes DIR/gpu_check.json and DIR/gpu_check.log. Every section runs in its own process with its
own time budget, inside a total budget (default 450 s): a crash, a hang or a CUDA error in one
section is recorded (status, exit code, the tail of its output) and the next one runs; a section
that would start after the total budget is spent is skipped. Without CUDA (or with --cpu-smoke)
the GPU sections are recorded as skipped with the reason. The JSON is rewritten after each
section, so a run cut short still leaves one.

Sections:
- environment: Python/torch/CUDA/cuDNN/triton/onnxruntime/diffusers versions, the GPU, nvidia-smi,
  the CUDA libraries the process mapped (libcudart from /proc/self/maps), whether `import
  tensorrt` works, which of diffusers' and pytest's dependencies import, and whether the
  installed ddpm_engine matches this tree (a stale wheel would test old code).
- driver_probe: builds the C driver and the graph loop (engine/cuda), the CUDA driver's version,
  the device count, the graph loop's embedded device code and the libcudart it links.
- tests_engine_cuda, tests_kernels, tests_gpu: `pytest -m "gpu or not gpu" <folder>` with
  TRITON_INTERPRET unset; AOTI cases are deselected (`--tests-k`, default "not aoti": one CIFAR
  compile takes minutes). Counts, failures, skip reasons and recorded properties (eps_rel_err,
  psnr_db) from the junit XML, or from the verbose log if the budget ran out.
- timing: host µs per step of each graph driver (a tiny model, DDIM-200, batch 1), then the
  digits and CIFAR-10 DDPM-1000 runs at batch 1 and 64 per driver through the public
  Engine.sample(seeds, driver=...), fp32, torch backend.
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
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.sections import error_record, run_section, write_json

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 450
MIN_SECTION_S = 5  # a section with less time than this left is skipped
TAIL_LINES = 40
DEFAULT_TESTS_K = "not aoti"
MODULES = ("torch", "triton", "onnxruntime", "onnx", "diffusers", "numpy", "pytest", "huggingface_hub",
           "safetensors", "importlib_metadata", "zipp", "regex", "requests", "PIL", "filelock", "tqdm",
           "pluggy", "iniconfig", "packaging", "pygments", "cupy", "cuda", "tensorrt")


@dataclass
class Section:
    """One step of the check: ``argv(out_dir)`` is its command, run from the repository root;
    ``collect(out_dir, log_path)`` turns what it left behind into the JSON's ``data``."""

    name: str
    budget_s: float
    needs_gpu: bool
    argv: Callable[[Path], list]
    collect: Callable[[Path, Path], dict] | None = None


# ---- the sections that run inside a child process (python -m bench.gpu_check --section NAME) ------
def _section_json(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / "sections" / f"{name}.json"


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


def _timing(data):
    import torch

    from bench.gpu_suite import cifar_loaded
    from bench.gpu_timing import host_us_per_step, sync_time
    from ddpm_engine import Engine
    from ddpm_engine.checkpoints import load
    from ddpm_engine.models import SeedUNet

    drivers = ("eager", "python", "c", "graph_loop", "auto")  # auto: Engine.sample's default path
    engines = {}

    def settings():
        return {"device": torch.cuda.get_device_name(), "backend": "torch", "precision": "fp32",
                "matmul_tf32": torch.backends.cuda.matmul.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
                "cudnn_benchmark": torch.backends.cudnn.benchmark}

    def host_us():
        torch.manual_seed(0)
        eng = Engine.from_module(SeedUNet(1, (8, 16)).eval(), sample_shape=(1, 8, 8), backend="torch",
                                 device="cuda")
        steps, seeds = 200, [1]
        out = {"model": "SeedUNet(1, (8, 16)) 1x8x8", "sampler": f"ddim-{steps}", "batch": 1,
               "eager": {"wall_us_per_step": 1e6 * sync_time(lambda: eng.sample(seeds, sampler="ddim",
                                                                                 steps=steps, driver="eager")) / steps}}
        graphed = eng.graphed("ddim", steps, max_batch=1)
        for d in drivers[1:-1]:
            try:
                out[d] = host_us_per_step(graphed, seeds, d, reps=3)
            except Exception as exc:  # one driver failing must not drop the others
                out[d] = error_record(exc)
        return out

    def engine(model):
        if model not in engines:
            loaded = load("digits") if model == "digits" else cifar_loaded(seed=0)
            engines[model] = Engine(loaded, backend="torch", device="cuda", precision="fp32")
        return engines[model]

    def runs(model, batch, steps=1000):
        eng = engine(model)
        seeds = list(range(1, batch + 1))
        out = {}
        eng.sample(seeds, sampler="ddpm", steps=10, driver="eager")  # warm-up: cuDNN algorithm choice, lazy inits
        try:  # capture this bucket's graph outside the timing
            eng.graphed("ddpm", steps).bucket(batch)
        except Exception as exc:  # the graph drivers below record their own errors
            out["capture_error"] = error_record(exc)
        for d in drivers:
            try:
                seconds = sync_time(lambda: eng.sample(seeds, sampler="ddpm", steps=steps, driver=d), reps=1,
                                    warm=False)
                out[d] = {"seconds": seconds, "ms_per_step": 1e3 * seconds / steps, "images_per_s": batch / seconds}
            except Exception as exc:
                out[d] = error_record(exc)
        return out

    yield "settings", settings
    yield "host_us_per_step", host_us
    for model in ("digits", "cifar10"):
        for batch in (1, 64):
            yield f"{model}_ddpm1000_b{batch}", lambda m=model, b=batch: runs(m, b)


CHILD_SECTIONS = {"environment": _environment, "driver_probe": _driver_probe, "timing": _timing}


def run_child(name: str, out_dir: Path) -> int:
    """Run child section ``name``: each of its parts recorded on its own, the JSON saved after each."""
    path = _section_json(out_dir, name)
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


def parse_pytest_log(path: Path) -> dict:
    """Per-outcome counts and the failed tests from ``pytest -v`` output (for a run cut short)."""
    counts, failed = {}, []
    for line in Path(path).read_text(errors="replace").splitlines():
        m = _RESULT_LINE.match(line)
        if m:
            counts[m.group(2)] = counts.get(m.group(2), 0) + 1
            if m.group(2) in ("FAILED", "ERROR"):
                failed.append(m.group(1))
    return {"counts_from_log": counts, "failed": failed}


def pytest_section(name: str, folder: str, budget_s: float, tests_k: str | None) -> Section:
    def argv(out_dir: Path) -> list:
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu or not gpu", folder, "-v", "-rfEs", "--tb=short",
               "--durations=10", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
               f"--junitxml={Path(out_dir) / 'junit' / f'{name}.xml'}"]
        return cmd + (["-k", tests_k] if tests_k else [])

    def collect(out_dir: Path, log_path: Path) -> dict:
        junit = Path(out_dir) / "junit" / f"{name}.xml"
        data = parse_junit(junit) if junit.is_file() else parse_pytest_log(log_path)
        data["command"] = shlex.join(argv(out_dir)[1:])
        return data

    return Section(name, budget_s, True, argv, collect)


def child_section(name: str, budget_s: float, needs_gpu: bool) -> Section:
    def collect(out_dir: Path, log_path: Path) -> dict:
        path = _section_json(out_dir, name)
        return json.loads(path.read_text()) if path.is_file() else {}

    return Section(name, budget_s, needs_gpu,
                   lambda out_dir: [sys.executable, "-m", "bench.gpu_check", "--section", name, "--out", str(out_dir)],
                   collect)


def default_sections(tests_k: str | None = DEFAULT_TESTS_K) -> list[Section]:
    """The check's sections with their budgets (seconds; they sum to TOTAL_BUDGET_S)."""
    return [
        child_section("environment", 35, needs_gpu=False),
        child_section("driver_probe", 35, needs_gpu=False),
        pytest_section("tests_engine_cuda", "tests/engine/cuda", 60, tests_k),
        pytest_section("tests_kernels", "tests/kernels", 100, tests_k),
        pytest_section("tests_gpu", "tests/gpu", 130, tests_k),
        child_section("timing", 90, needs_gpu=True),
    ]


# ---- the orchestrating parent -------------------------------------------------------------------
def _tail(path: Path, n: int = TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _child_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # kernels compile for the GPU, not the interpreter
    env.setdefault("DDPM_ENGINE_CACHE", str(Path(tempfile.gettempdir()) / "ddpm-engine-gpu-check"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(section: Section, out_dir: Path, timeout: float, log_path: Path) -> dict:
    t0 = time.perf_counter()
    argv = section.argv(out_dir)
    record = {"budget_s": round(timeout, 1), "command": shlex.join(map(str, argv))}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as logf:
        try:
            proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, env=_child_env(),
                                    start_new_session=True)
        except OSError as exc:
            return dict(record, status="failed", error=f"could not start: {exc}", seconds=0.0)
        try:
            rc = proc.wait(timeout=timeout)
            record.update(status="ok" if rc == 0 else "failed", rc=rc)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the section's own process group: it and its children
            proc.wait()
            record.update(status="timeout", rc=None, error=f"stopped after its budget of {timeout:.0f} s")
    record["seconds"] = round(time.perf_counter() - t0, 2)
    if section.collect is not None:
        try:
            record["data"] = section.collect(out_dir, log_path)
        except Exception as exc:  # e.g. a half-written junit file
            record["collect_error"] = f"{type(exc).__name__}: {exc}"
    if record["status"] != "ok":
        record.setdefault("error", f"exit code {record.get('rc')}")
        record["output_tail"] = _tail(log_path)
    return record


def run_sections(sections: list[Section], out_dir, total_budget_s: float = TOTAL_BUDGET_S, gpu: bool | None = None,
                 mode_note: str = "", echo=print) -> dict:
    """Run ``sections`` in order, each in its own process with min(its budget, the time left);
    write out_dir/gpu_check.json after each and out_dir/gpu_check.log throughout; the results.
    ``gpu=None``: decided after the environment section (torch.cuda.is_available() there)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, log_path = out_dir / "gpu_check.json", out_dir / "gpu_check.log"
    start = time.perf_counter()
    results = {"tool": "bench.gpu_check", "started": datetime.datetime.now().isoformat(timespec="seconds"),
               "total_budget_s": total_budget_s, "gpu": gpu, "sections": {}, "summary": {}}

    def set_mode():
        results["mode"] = None if gpu is None else "gpu" if gpu else f"cpu-smoke ({mode_note or 'no GPU'})"

    set_mode()

    with open(log_path, "a") as log:
        def say(msg):
            line = f"[{time.strftime('%H:%M:%S')}] {msg}"
            echo(line, flush=True)
            log.write(line + "\n")
            log.flush()

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
                section_log = out_dir / "logs" / f"{section.name}.log"
                record = _run(section, out_dir, budget, section_log)
                log.write(f"----- {section.name} output -----\n{_read(section_log)}\n----- end {section.name} -----\n")
            results["sections"][section.name] = record
            results["summary"][section.name] = record["status"]
            say(f"section {section.name}: {record['status']}"
                + (f" in {record['seconds']} s" if "seconds" in record else f" ({record.get('reason')})")
                + (f": {record['error']}" if record.get("error") else ""))
            results["elapsed_s"] = round(time.perf_counter() - start, 1)
            write_json(json_path, results)
        results["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        write_json(json_path, results)
        say(f"wrote {json_path} and {log_path}: " + json.dumps(results["summary"]))
    return results


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


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
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.log and the section logs")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run only the sections that need no GPU (automatic when torch sees no CUDA device)")
    ap.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="total time budget in seconds")
    ap.add_argument("--only", default=None, help="comma-separated section names to run (default: all)")
    ap.add_argument("--tests-k", default=DEFAULT_TESTS_K, help="pytest -k expression for the test sections "
                    "('' for all, e.g. to include the AOTI cases)")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)  # internal: run one child section
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    if args.section is not None:
        if args.section not in CHILD_SECTIONS:
            ap.error(f"unknown section {args.section!r}; child sections: {sorted(CHILD_SECTIONS)}")
        return run_child(args.section, out_dir)
    sections = default_sections(args.tests_k or None)
    if args.only:
        wanted = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = wanted - {s.name for s in sections}
        if unknown:
            ap.error(f"unknown sections {sorted(unknown)}; choose from {[s.name for s in sections]}")
        sections = [s for s in sections if s.name in wanted]
    gpu = False if args.cpu_smoke else None
    note = "--cpu-smoke given" if args.cpu_smoke else "torch.cuda.is_available() is False"
    results = run_sections(sections, out_dir, args.budget_s, gpu, note)
    return 0 if all(v in ("ok", "skipped") for v in results["summary"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
