"""Turn a GPU bench JSON (python -m bench.gpu_check writes gpu_check.json) into a markdown report and a plot.

    python -m bench.report bench/results/2026-12-04-H200-gpu_check.json   # .md and .png beside it

The markdown: device and versions, the latency target (the best engine DDPM-1000 at batch 1 against
DDPMPipeline fp32), parity, the host's µs per step per driver, latency, throughput (images/s and %
of the measured bf16 matmul peak), the peers with the engine's speed-up. The PNG (matplotlib):
seconds per full-length request and images/s against batch, log-log, peers as crosses.
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
KEY = ("model", "backend", "precision", "driver")
ORDER = {name: k for k, name in enumerate((*MODES, *DRIVERS))}


def _fmt(v, digits=3) -> str:
    if not isinstance(v, float):
        return "-" if v is None else str(v)
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:,.{max(digits - 2, 1)}f}"
    return f"{v:.{digits}e}"


def _table(title: str, headers: list, rows: list) -> list[str]:
    """A markdown section: its title and one table."""
    return [f"## {title}", "", "| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
            *("| " + " | ".join(map(_fmt, row)) + " |" for row in rows), ""]


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


def _key(r: dict) -> tuple:
    return r.get("model", "cifar10"), r["backend"], r["precision"], r.get("driver", "-")


def _pivot(rows: list, column, cell, columns=None, extra=lambda key: []) -> tuple[list, list]:
    """One line per model/backend/precision/driver (in the bench's order), one cell per ``column(row)``
    (of ``columns``: default all); ``extra(key)`` appends cells."""
    columns = sorted({column(r) for r in rows}) if columns is None else columns
    cells = {(_key(r), column(r)): cell(r) for r in rows if column(r) in columns}
    keys = sorted({_key(r) for r in rows}, key=lambda k: (k[0], k[1], *(ORDER.get(x, len(ORDER)) for x in k[2:])))
    return columns, [[*k, *(cells.get((k, c)) for c in columns), *extra(k)] for k in keys]


def latency_table(rows: list) -> list[str]:
    columns, lines = _pivot(rows, lambda r: (r["steps"], r["sampler"], r["batch"]), lambda r: 1e3 * r["seconds"])
    return _table("Latency (ms per request)", [*KEY, *(f"{'one step' if n == 1 else f'{s}-{n}'} b{b} (ms)"
                                                      for n, s, b in columns)], lines)


def throughput_table(rows: list, results: dict) -> list[str]:
    def cell(r):
        u = mfu(r["images_per_s"], r["steps"], results, r.get("model"))
        return _fmt(r["images_per_s"]) + ("" if u is None else f" ({100 * u:.1f}%)")

    largest = {_key(r): [r["batch"], cell(r)] for r in rows if r.get("largest")}
    columns, lines = _pivot(rows, lambda r: r["batch"], cell, sorted({r["batch"] for r in rows if not r.get("largest")}),
                            (lambda k: largest.get(k, [None, None])) if largest else lambda k: [])
    return _table("Throughput (images/s at the full step count; % of the bf16 matmul peak)",
                  [*KEY, *(f"b{b}" for b in columns), *(["largest batch", "at the largest"] if largest else [])], lines)


def best_engine(results: dict, peer: dict):
    """The fastest engine row at the peer's model, precision, batch and steps: (seconds, row) or None."""
    def same(r):
        return all(r.get(k, d) == peer.get(k, d) for k, d in (("model", "cifar10"), ("precision", None),
                                                               ("batch", None), ("steps", None)))

    found = [(r["seconds"], r) for r in results.get("latency", []) if same(r) and r["sampler"] == peer.get("sampler", "ddpm")]
    found += [(r["batch"] / r["images_per_s"], r) for r in results.get("throughput", []) if same(r)]
    return min(found, key=lambda f: f[0]) if found else None


def peers_table(results: dict) -> list[str]:
    rows = []
    for p in results["peers"]:
        s, best = best_engine(results, p) or (None, {})
        rows.append([p.get("model", "cifar10"), p["name"], p.get("precision"), p.get("batch"), p.get("steps"),
                     p.get("steps_measured", p.get("steps")), p.get("seconds"), p.get("images_per_s"), s,
                     f"{best['backend']} {best.get('driver', '')}".strip() if best else None,
                     f"{p['seconds'] / s:.1f}x" if s and p.get("seconds") else None])
    return _table("Peers (engine: the fastest engine row at the same model, precision, batch and steps)",
                  ["model", "peer", "precision", "batch", "steps", "steps timed", "seconds", "images/s",
                   "engine seconds", "engine (best)", "engine speed-up"], rows)


def latency_target(results: dict) -> list[str]:
    """The best engine DDPM-1000 at batch 1 (any precision) against DDPMPipeline fp32 (target: 25x)."""
    def full(r):
        return r.get("model", "cifar10") == "cifar10" and r.get("batch") == 1 and r.get("steps") == 1000

    base = [p for p in results.get("peers", []) if p["name"].startswith("diffusers") and p.get("precision") == "fp32"
            and full(p)]
    engine = [r for r in results.get("latency", []) if full(r) and r["sampler"] == "ddpm"]
    if not base or not engine:
        return []
    best = min(engine, key=lambda r: r["seconds"])
    return [f"Latency target (CIFAR-10, DDPM-1000, batch 1): best engine {best['seconds']:.3g} s "
            f"({best['backend']} {best['precision']} {best.get('driver', '')}) vs DDPMPipeline fp32 "
            f"{base[0]['seconds']:.3g} s: **{base[0]['seconds'] / best['seconds']:.1f}x** (target >= 25x)", ""]


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
    if results.get("parity"):
        lines += _table("Parity against eager fp32", [*KEY, "eps rel err", "image max abs", "PSNR dB"],
                        [[r.get("model", "-"), r["backend"], r["precision"], r.get("driver", "-"), r.get("eps_rel_err"),
                          r.get("image_max_abs"), r.get("psnr_db")] for r in results["parity"]])
    if host := results.get("host_us_per_step"):
        lines += _table("Host time per step (µs)", HOST_DRIVERS, [[host.get(k) for k in HOST_DRIVERS]])
    lines += latency_table(results["latency"]) if results.get("latency") else []
    lines += throughput_table(results["throughput"], results) if results.get("throughput") else []
    lines += peers_table(results) if results.get("peers") else []
    lines += [f"Sections that did not end ok: {', '.join(results['not_ok'])}", ""] if results.get("not_ok") else []
    return "\n".join(lines + [f"- {note}" for note in results.get("notes", [])]).rstrip() + "\n"


def plot(results: dict, path) -> Path:
    """Seconds per full-length request and images/s against batch, one line per model/backend/
    precision/driver (colour: precision; line style: driver), log-log, peers as crosses."""
    from ddpm_engine.errors import require

    require("matplotlib", "bench/report.py's plot").use("Agg")
    import matplotlib.pyplot as plt

    latency, series = results.get("latency", []), {}
    full = {m: max(r["steps"] for r in latency if r.get("model", "cifar10") == m) for m in {r.get("model", "cifar10")
                                                                                         for r in latency}}
    for r in latency + results.get("throughput", []):
        if "images_per_s" in r or (r["steps"] == full[r.get("model", "cifar10")] and r["sampler"] == "ddpm"):
            seconds = r["batch"] / r["images_per_s"] if "images_per_s" in r else r["seconds"]
            series.setdefault(_key(r), set()).add((r["batch"], seconds))
    fig, (ax_lat, ax_tput) = plt.subplots(1, 2, figsize=(13, 5))
    colours, styles = {m: f"C{k}" for k, m in enumerate(MODES)}, dict(zip(DRIVERS, ("-", ":", "-.", "--", (0, (1, 1)))))
    for (model, backend, precision, driver), pts in sorted(series.items()):
        kw = {"color": colours.get(precision), "linestyle": styles.get(driver, "-"), "marker": "o",
              "label": f"{model} {backend} {precision} {driver}"}
        ax_lat.plot([b for b, _ in sorted(pts)], [s for _, s in sorted(pts)], **kw)
        ax_tput.plot([b for b, _ in sorted(pts)], [b / s for b, s in sorted(pts)], **kw)
    for p in results.get("peers", []):
        if p.get("seconds"):
            for ax, y in ((ax_lat, p["seconds"]), (ax_tput, p["images_per_s"])):
                ax.plot([p["batch"]], [y], "X", color=colours.get(p.get("precision")), mec="k", ms=9, zorder=5)
    for ax, ylabel in ((ax_lat, "seconds per full-length request"), (ax_tput, "images / s")):
        ax.set(yscale="log", xlabel="batch", ylabel=ylabel, title="x: peers")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    if ax_lat.lines:
        ax_lat.legend(fontsize=6, ncol=2)
    fig.suptitle(title(results), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_report(results_path, out_dir=None) -> tuple[Path, Path]:
    """Write <stem>.md and <stem>.png for a results JSON (its ``measured`` where gpu_check wrote one)."""
    results_path = Path(results_path)
    results = json.loads(results_path.read_text())
    if "measured" in results:
        results = dict(results["measured"], date=results["started"][:10],
                       not_ok=[name for name, status in results["summary"].items() if status != "ok"])
    out_dir = Path(out_dir or results_path.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    (md := out_dir / f"{results_path.stem}.md").write_text(markdown(results), encoding="utf-8")
    return md, plot(results, out_dir / f"{results_path.stem}.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a results JSON written by python -m bench.gpu_check")
    ap.add_argument("--out-dir", default=None, help="where to write the .md and .png (default: beside the JSON)")
    args = ap.parse_args(argv)
    md, png = write_report(args.results, args.out_dir)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
