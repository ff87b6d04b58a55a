"""Turn a GPU bench JSON (python -m bench.gpu_check writes gpu_check.json) into a markdown report.

    python -m bench.report bench/results/2026-12-04-H200-gpu_check.json   # the .md beside it

Device and versions, the latency target (the best engine DDPM-1000 at batch 1 against DDPMPipeline
fp32), then one table per kind of row: parity, the host's µs per step per driver, latency,
throughput (with % of the measured bf16 matmul peak), peers (with the engine's speed-up).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ddpm_engine.engine import DRIVERS

from bench.measure import MODES

HOST_DRIVERS = ("eager", "python", "c", "graph_loop")
TITLE_VERSIONS = ("torch", "cuda", "cudnn", "triton", "onnxruntime", "tensorrt", "diffusers")
ORDER = {name: k for k, name in enumerate((*MODES, *DRIVERS))}


def _fmt(v, digits=3) -> str:
    if not isinstance(v, float):
        return "-" if v is None else str(v)
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:,.{max(digits - 2, 1)}f}"
    return f"{v:.{digits}e}"


def _key(r: dict) -> tuple:
    return r.get("model", "cifar10"), r.get("backend", "-"), r.get("precision"), r.get("driver", "-")


def _table(title: str, columns: dict, rows: list) -> list[str]:
    """A markdown section: ``title``, then one line per row (in the bench's order of backends,
    precisions and drivers) and a column per {header: the row's key, or a function of the row}."""
    rows = sorted(rows, key=lambda r: (*_key(r)[:2], *(ORDER.get(x, len(ORDER)) for x in _key(r)[2:]),
                                       r.get("steps", 0), r.get("batch", 0)))
    cells = [[c(r) if callable(c) else r.get(c) for c in columns.values()] for r in rows]
    return [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|",
            *("| " + " | ".join(map(_fmt, line)) + " |" for line in cells), ""]


def title(results: dict) -> str:
    v = results.get("versions") or {}
    names = ", ".join(f"{k} {v[k]}" for k in TITLE_VERSIONS if v.get(k) and not str(v[k]).startswith("NOT"))
    return f"{results.get('device', 'unknown device')}, {results.get('date', 'undated')}" + (f" ({names})" if names else "")


def mfu(images_per_s: float, steps: int, results: dict, model: str | None = None):
    """Model FLOP utilisation: achieved FLOP/s over the measured bf16 matmul peak ({model: FLOPs};
    a bare number is the CIFAR UNet's)."""
    flops, peak = results.get("flops_per_image_step"), results.get("matmul_peak_tflops")
    flops = flops.get(model or "cifar10") if isinstance(flops, dict) else flops
    return images_per_s * steps * flops / (peak * 1e12) if flops and peak else None


def best_engine(results: dict, peer: dict):
    """The fastest engine row at the peer's model, precision, batch and steps: (seconds, row) or None."""
    def same(r):
        return all(r.get(k, d) == peer.get(k, d) for k, d in (("model", "cifar10"), ("precision", None),
                                                               ("batch", None), ("steps", None)))

    found = [(r["seconds"], r) for r in results.get("latency", []) if same(r) and r["sampler"] == peer.get("sampler", "ddpm")]
    found += [(r["batch"] / r["images_per_s"], r) for r in results.get("throughput", []) if same(r)]
    return min(found, key=lambda f: f[0]) if found else None


def latency_target(results: dict) -> list[str]:
    """The best engine DDPM-1000 at batch 1 (any precision) against DDPMPipeline fp32 (target: 25x)."""
    def full(r):
        return r.get("model", "cifar10") == "cifar10" and r.get("batch") == 1 and r.get("steps") == 1000

    base = [p for p in results.get("peers", []) if p["name"].startswith("diffusers") and p.get("precision") == "fp32"
            and full(p)]
    engine = [r for r in results.get("latency", []) if full(r) and r["sampler"] == "ddpm"]
    if not base or not engine:
        return []
    best, peer_s = min(engine, key=lambda r: r["seconds"]), base[0]["seconds"]
    return [f"Latency target (CIFAR-10, DDPM-1000, batch 1): best engine {best['seconds']:.3g} s ({best['backend']} "
            f"{best['precision']} {best.get('driver', '')}) vs DDPMPipeline fp32 {peer_s:.3g} s: "
            f"**{peer_s / best['seconds']:.1f}x** (target >= 25x)", ""]


def markdown(results: dict) -> str:
    lines = [f"# ddpm-engine performance: {title(results)}", ""]
    lines += [f"Model: {results['model']}", ""] if results.get("model") else []
    flops = results.get("flops_per_image_step")
    for name, value in (flops.items() if isinstance(flops, dict) else [("CIFAR-10 UNet", flops)] if flops else []):
        lines.append(f"Model FLOPs per image per step ({name}): {value / 1e9:.2f} GFLOP "
                     "(torch.utils.flop_counter, a multiply-add counts 2)")
    if results.get("matmul_peak_tflops"):
        lines.append(f"Measured bf16 matmul peak: {results['matmul_peak_tflops']:.1f} TFLOP/s")
    lines += [""] + latency_target(results)
    key = {k: lambda r, i=i: _key(r)[i] for i, k in enumerate(("model", "backend", "precision", "driver"))}
    peers = []
    for p in results.get("peers", []):
        s, best = best_engine(results, p) or (None, {})
        peers.append(dict(p, engine_s=s, engine=f"{best['backend']} {best.get('driver', '')}".strip() if best else None,
                          speedup=f"{p['seconds'] / s:.1f}x" if s and p.get("seconds") else None))
    tables = [
        ("Parity against eager fp32", {**key, "eps rel err": "eps_rel_err", "image max abs": "image_max_abs",
                                       "PSNR dB": "psnr_db"}, results.get("parity")),
        ("Host time per step (µs)", dict(zip(HOST_DRIVERS, HOST_DRIVERS)), [h] if (h := results.get("host_us_per_step"))
         else []),
        ("Latency (ms per request)", {**key, "request": lambda r: f"{r['sampler']}-{r['steps']} b{r['batch']}",
                                      "ms": lambda r: 1e3 * r["seconds"],
                                      "ms per step": lambda r: 1e3 * r["seconds"] / r["steps"]}, results.get("latency")),
        ("Throughput (images/s at the full step count; % of the bf16 matmul peak)", {
            **key, "batch": "batch", "images/s": "images_per_s",
            "% of peak": lambda r: None if (u := mfu(r["images_per_s"], r["steps"], results, r.get("model"))) is None
            else f"{100 * u:.1f}%"}, results.get("throughput")),
        ("Peers (engine: the fastest engine row at the same model, precision, batch and steps)", {
            "model": key["model"], "peer": "name", "precision": "precision", "batch": "batch", "steps": "steps",
            "steps timed": lambda r: r.get("steps_measured", r.get("steps")), "seconds": "seconds",
            "images/s": "images_per_s", "engine seconds": "engine_s", "engine (best)": "engine",
            "engine speed-up": "speedup"}, peers),
    ]
    for heading, columns, rows in tables:
        lines += _table(heading, columns, rows) if rows else []
    lines += [f"Sections that did not end ok: {', '.join(results['not_ok'])}", ""] if results.get("not_ok") else []
    return "\n".join(lines + [f"- {note}" for note in results.get("notes", [])]).rstrip() + "\n"


def write_report(results_path, out_dir=None) -> Path:
    """Write <stem>.md for a results JSON (its ``measured`` where gpu_check wrote one)."""
    results_path = Path(results_path)
    results = json.loads(results_path.read_text())
    if "measured" in results:
        results = dict(results["measured"], date=results["started"][:10],
                       not_ok=[name for name, status in results["summary"].items() if status != "ok"])
    out_dir = Path(out_dir or results_path.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    (md := out_dir / f"{results_path.stem}.md").write_text(markdown(results), encoding="utf-8")
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a results JSON written by python -m bench.gpu_check")
    ap.add_argument("--out-dir", default=None, help="where to write the .md (default: beside the JSON)")
    args = ap.parse_args(argv)
    print(f"wrote {write_report(args.results, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
