"""Turn a bench results JSON (python -m bench.gpu_suite writes them) into a markdown report and a plot.

    python -m bench.report bench/results/2026-11-23-NVIDIA_H100.json   # writes .md and .png beside it

The markdown has the device and versions, the parity table, host time per step by driver, the
latency and throughput tables (throughput with model FLOP utilisation when the FLOP count and the
measured matmul peak are in the file) and the peers. The PNG plots latency and images/s against
batch size, one line per backend/precision(/driver), log-log. Needs matplotlib for the plot only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HOST_DRIVERS = ("python", "python_graph", "c_driver", "graph_loop")


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:,.{max(digits - 2, 1)}f}"
        return f"{v:.{digits}e}"
    return str(v)


def _table(headers: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return out + [""]


def title(results: dict) -> str:
    v = results.get("versions", {})
    names = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    return f"{results.get('device', 'unknown device')}, {results.get('date', 'undated')}" + (f" ({names})" if names else "")


def mfu(images_per_s: float, steps: int, results: dict):
    """Model FLOP utilisation: achieved model FLOP/s over the measured bf16 matmul peak."""
    flops, peak = results.get("flops_per_image_step"), results.get("matmul_peak_tflops")
    if not flops or not peak:
        return None
    return images_per_s * steps * flops / (peak * 1e12)


def markdown(results: dict) -> str:
    lines = [f"# ddpm-engine performance: {title(results)}", ""]
    if results.get("model"):
        lines += [f"Model: {results['model']}", ""]
    if results.get("flops_per_image_step"):
        lines += [f"Model FLOPs per image per step: {results['flops_per_image_step'] / 1e9:.2f} GFLOP "
                  "(torch.utils.flop_counter, a multiply-add counts 2)"]
    if results.get("matmul_peak_tflops"):
        lines += [f"Measured bf16 matmul peak: {results['matmul_peak_tflops']:.1f} TFLOP/s"]
    lines.append("")
    if results.get("parity"):
        lines += ["## Parity against eager fp32", ""]
        lines += _table(["model", "backend", "precision", "eps rel err", "image max abs", "PSNR dB"],
                        [[r.get("model", "-"), r["backend"], r["precision"], r.get("eps_rel_err"),
                          r.get("image_max_abs"), r.get("psnr_db")] for r in results["parity"]])
    host = results.get("host_us_per_step") or {}
    if host:
        lines += ["## Host time per step (µs)", ""]
        lines += _table(list(HOST_DRIVERS), [[host.get(k) for k in HOST_DRIVERS]])
    if results.get("latency"):
        lines += ["## Latency", ""]
        rows = sorted(results["latency"], key=lambda r: (r["backend"], r["precision"], r.get("driver", ""),
                                                         r["sampler"], r["steps"], r["batch"]))
        lines += _table(["backend", "precision", "driver", "sampler", "steps", "batch", "seconds", "ms/step"],
                        [[r["backend"], r["precision"], r.get("driver", "-"), r["sampler"], r["steps"], r["batch"],
                          r["seconds"], 1e3 * r["seconds"] / r["steps"]] for r in rows])
    if results.get("throughput"):
        lines += ["## Throughput", ""]
        rows = sorted(results["throughput"], key=lambda r: (r["backend"], r["precision"], r["batch"]))
        util = [mfu(r["images_per_s"], r["steps"], results) for r in rows]
        lines += _table(["backend", "precision", "batch", "steps", "images/s", "MFU"],
                        [[r["backend"], r["precision"], r["batch"], r["steps"], r["images_per_s"],
                          None if u is None else f"{100 * u:.1f}%"] for r, u in zip(rows, util)])
    if results.get("peers"):
        lines += ["## Peers", ""]
        lines += _table(["peer", "precision", "batch", "steps", "seconds", "images/s"],
                        [[r["name"], r.get("precision"), r.get("batch"), r.get("steps"), r.get("seconds"),
                          r.get("images_per_s")] for r in results["peers"]])
    for note in results.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


def plot(results: dict, path) -> Path:
    """Latency (s) and images/s vs batch, one line per configuration; writes a PNG."""
    from ddpm_engine.errors import require

    matplotlib = require("matplotlib", "bench/report.py's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_tput) = plt.subplots(1, 2, figsize=(12, 4.8))
    series: dict[str, list] = {}
    for r in results.get("latency", []):
        label = f"{r['backend']} {r['precision']} {r.get('driver', '')} {r['sampler']}-{r['steps']}".replace("  ", " ")
        series.setdefault(label, []).append((r["batch"], r["seconds"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax_lat.plot([b for b, _ in pts], [s for _, s in pts], marker="o", label=label)
    series = {}
    for r in results.get("throughput", []):
        series.setdefault(f"{r['backend']} {r['precision']} ({r['steps']} steps)", []).append(
            (r["batch"], r["images_per_s"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax_tput.plot([b for b, _ in pts], [s for _, s in pts], marker="o", label=label)
    for ax, ylabel in ((ax_lat, "latency per request (s)"), (ax_tput, "images / s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title(results), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results_path, out_dir=None) -> tuple[Path, Path]:
    """Write <stem>.md and <stem>.png for a results JSON; returns their paths."""
    results_path = Path(results_path)
    results = json.loads(results_path.read_text())
    out_dir = Path(out_dir) if out_dir is not None else results_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{results_path.stem}.md"
    md.write_text(markdown(results))
    png = plot(results, out_dir / f"{results_path.stem}.png")
    return md, png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a results JSON written by python -m bench.gpu_suite")
    ap.add_argument("--out-dir", default=None, help="where to write the .md and .png (default: beside the JSON)")
    args = ap.parse_args(argv)
    md, png = write_report(args.results, args.out_dir)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
