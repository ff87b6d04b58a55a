"""Independent measurement sections: each section's result, or its error with the traceback, goes
into one results dict, which is written as JSON after every section, so one failing section never
costs the others (bench/gpu_suite.py, bench/gpu_check.py)."""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path


def error_record(exc: BaseException) -> dict:
    """{'error': 'Type: message', 'traceback': full text} for an exception being handled."""
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def run_section(results: dict, name: str, fn, log=print, out: Path | None = None):
    """results[name] = fn(); on an exception, results['errors'][name] = error_record(exc) instead.
    The section's wall seconds go to results['section_seconds'][name]; with ``out`` the results are
    written there afterwards. Returns fn()'s value, or None if it raised."""
    t0 = time.perf_counter()
    value = None
    try:
        value = results[name] = fn()
    except Exception as exc:  # a failing section is recorded; the next one runs
        results.setdefault("errors", {})[name] = error_record(exc)
        log(f"section {name} failed: {results['errors'][name]['error']}\n{results['errors'][name]['traceback']}")
    results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 3)
    if out is not None:
        write_json(out, results)
    return value


def write_json(path, results: dict) -> Path:
    """Write ``results`` as indented JSON (non-JSON values as their str), via a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)
    return path
