"""bench/report.py on a small synthetic results file (the numbers are made up, not measured)."""

import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    return importlib.import_module(f"bench.{name}")


SYNTHETIC = {
    "device": "Synthetic GPU 80GB",
    "date": "2026-01-01",
    "versions": {"torch": "2.13.0", "cuda": "13.0", "tensorrt": None},
    "model": "cifar10 UNet (random weights)",
    "flops_per_image_step": 11.95e9,
    "matmul_peak_tflops": 100.0,
    "parity": [{"model": "cifar10", "backend": "torch", "precision": "fp16", "eps_rel_err": 1.2e-3,
                "image_max_abs": 0.05, "psnr_db": 41.5}],
    "host_us_per_step": {"eager": 2500.0, "python": 30.0, "c": 8.0, "graph_loop": None},
    "latency": [{"backend": "torch", "precision": "fp16", "driver": "c", "batch": b, "sampler": "ddim",
                 "steps": 50, "seconds": 0.1 * b ** 0.5} for b in (1, 4, 16)]
    + [{"model": "cifar10", "backend": "torch", "precision": p, "driver": d, "batch": 1, "sampler": "ddpm",
        "steps": 1000, "seconds": s} for p, d, s in (("fp32", "eager", 3.0), ("fp32", "c", 0.8),
                                                     ("bf16", "graph_loop", 0.4))],
    "throughput": [{"backend": be, "precision": "fp16", "batch": b, "steps": 1000, "images_per_s": k * b}
                   for be, k in (("torch", 0.005), ("tensorrt", 0.01)) for b in (8, 64)]
    + [{"model": "cifar10", "backend": "torch", "precision": "bf16", "driver": "eager", "batch": 4096, "steps": 1000,
        "steps_measured": 2, "images_per_s": 4.0, "largest": True, "largest_limit": "out of memory at 8192"}],
    "peers": [{"name": "diffusers DDPMPipeline", "precision": "fp32", "batch": 16, "steps": 1000,
               "seconds": 60.0, "images_per_s": 0.27},
              {"name": "diffusers DDPMPipeline", "model": "cifar10", "precision": "fp32", "batch": 1, "steps": 1000,
               "sampler": "ddpm", "seconds": 10.0, "images_per_s": 0.1},
              {"name": "torch.compile max-autotune (Python loop)", "model": "cifar10", "precision": "fp16",
               "batch": 64, "steps": 1000, "steps_measured": 20, "sampler": "ddpm", "seconds": 400.0,
               "images_per_s": 0.16}],
    "not_ok": ["backends"],
}


def test_markdown_has_every_section():
    report = _load("report")
    md = report.markdown(SYNTHETIC)
    assert "Synthetic GPU 80GB" in md and "torch 2.13.0" in md and "tensorrt" not in md.split("\n")[0]
    for section in ("Parity", "Host time per step", "Latency", "Throughput", "Peers"):
        assert f"## {section}" in md
    assert "11.95 GFLOP" in md and "diffusers DDPMPipeline" in md
    # throughput: images/s and % of the bf16 peak; MFU of tensorrt at batch 64:
    # 0.64 img/s * 1000 steps * 11.95 GFLOP / 100 TFLOP/s = 7.648%; at 8: 0.956%
    assert "| cifar10 | tensorrt | fp16 | - | 8 | 0.08 | 1.0% |\n| cifar10 | tensorrt | fp16 | - | 64 | 0.64 | 7.6% |" in md
    assert "| cifar10 | torch | bf16 | eager | 4096 | 4.0 | 47.8% |" in md
    # latency: one line per model/backend/precision/driver and request setting, in the bench's order
    assert "| model | backend | precision | driver | request | ms | ms per step |" in md
    assert ("| cifar10 | torch | fp32 | c | ddpm-1000 b1 | 800.0 | 0.8 |\n"
            "| cifar10 | torch | fp16 | c | ddim-50 b1 | 100.0 | 2.0 |\n"
            "| cifar10 | torch | fp16 | c | ddim-50 b4 | 200.0 | 4.0 |") in md
    # peers: the engine's best row at the same model, precision, batch and steps
    assert "| cifar10 | diffusers DDPMPipeline | fp32 | 1 | 1000 | 1000 | 10.0 | 0.1 | 0.8 | torch c | 12.5x |" in md
    assert ("| cifar10 | torch.compile max-autotune (Python loop) | fp16 | 64 | 1000 | 20 | 400.0 | 0.16 | 100.0 "
            "| tensorrt | 4.0x |") in md
    assert "| cifar10 | diffusers DDPMPipeline | fp32 | 16 | 1000 | 1000 | 60.0 | 0.27 | - | - | - |" in md
    assert "best engine 0.4 s (torch bf16 graph_loop) vs DDPMPipeline fp32 10 s: **25.0x** (target >= 25x)" in md
    assert "Sections that did not end ok: backends" in md


def test_markdown_of_a_sparse_file():
    md = _load("report").markdown({"device": "x", "host_us_per_step": {"eager": 1.0}})
    assert "## Host time per step" in md and "## Latency" not in md


def test_mfu_per_model():
    report = _load("report")
    results = {"flops_per_image_step": {"cifar10": 1e10, "digits": 1e8}, "matmul_peak_tflops": 100.0}
    assert report.mfu(10.0, 1000, results, "digits") == pytest.approx(10 * 1000 * 1e8 / 1e14)
    assert report.mfu(10.0, 1000, results) == pytest.approx(10 * 1000 * 1e10 / 1e14)  # the CIFAR UNet's
    assert report.mfu(5.0, 1000, {"flops_per_image_step": 1e10, "matmul_peak_tflops": 100.0}, "cifar10") == \
        pytest.approx(0.5)  # a bare number (older files) is the CIFAR UNet's
    assert report.mfu(10.0, 1000, {"flops_per_image_step": 1e10}) is None


def test_write_report_and_the_command(tmp_path):
    report = _load("report")
    path = tmp_path / "2026-01-01-synthetic.json"
    path.write_text(json.dumps(SYNTHETIC))
    md = report.write_report(path, tmp_path / "out")
    assert md == tmp_path / "out" / "2026-01-01-synthetic.md"
    assert md.read_text().startswith("# ddpm-engine performance: Synthetic GPU 80GB")
    assert report.main([str(path), "--out-dir", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "2026-01-01-synthetic.md").exists()


def test_the_report_of_a_gpu_check_json_reads_what_it_measured(tmp_path):
    report = _load("report")
    measured = {k: v for k, v in SYNTHETIC.items() if k not in ("date", "not_ok")}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps({"started": "2026-12-04T10:00:00", "summary": {"latency": "ok", "matrix": "timeout"},
                                "sections": {}, "measured": measured}))
    md = report.write_report(path)
    text = md.read_text()
    assert text.startswith("# ddpm-engine performance: Synthetic GPU 80GB, 2026-12-04")
    assert "Sections that did not end ok: matrix" in text and "## Latency" in text
