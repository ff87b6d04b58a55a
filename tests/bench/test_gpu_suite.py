"""bench/gpu_suite.py on the CPU: the row functions with the digits model (and a tiny diffusers UNet)
at 1-3 steps give rows of the documented schema; the largest-batch search stops where memory runs
out; the bench precisions set and restore torch's flags; and ``main`` runs the chosen sections,
skips what does not fit in --budget-s, and merges later calls into one JSON. Timings here measure
nothing: the numbers are only checked to be positive and finite."""

import json
import math

import pytest
import torch

from bench import gpu_suite as suite
from ddpm_engine.checkpoints import load
from ddpm_engine.models import SeedUNet

LATENCY_KEYS = {"model", "backend", "precision", "driver", "batch", "sampler", "steps", "seconds", "ms_per_step", "reps"}
THROUGHPUT_KEYS = {"model", "backend", "precision", "driver", "batch", "steps", "steps_measured", "seconds_per_step",
                   "images_per_s", "largest"}
PEER_KEYS = {"name", "model", "precision", "batch", "sampler", "steps", "steps_measured", "seconds", "images_per_s"}


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def check_rows(rows, keys):
    assert rows and json.loads(json.dumps(rows)) == rows
    for r in rows:
        assert keys <= set(r), sorted(keys - set(r))
        assert all(positive(r[k]) for k in ("seconds", "ms_per_step", "seconds_per_step", "images_per_s") if k in r), r


@pytest.mark.parametrize("mode", suite.MODES)
def test_math_mode_sets_tf32_for_tf32_only_and_restores_the_flags(mode):
    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")
    for start in (False, True):
        for obj, name in flags:
            setattr(obj, name, start)
        with pytest.raises(RuntimeError, match="inside"), suite.math_mode(mode):
            assert [getattr(o, n) for o, n in flags] == [mode == "tf32"] * 2
            raise RuntimeError("inside")
        assert [getattr(o, n) for o, n in flags] == [start] * 2
    with pytest.raises(ValueError, match="bench precision"):
        suite.math_mode("tf16")


def test_exact_fp32_turns_tf32_off_and_cudnn_deterministic():
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32
    with suite.exact_fp32():
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (True, False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with suite.math_mode("tf32"):  # nested: TF32 on, determinism kept
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32) == before


def test_latency_rows_one_per_setting_and_cpu_driver(digits):
    notes = []
    rows = suite.latency_rows(digits, "digits", "torch", "tf32", "cpu", suite.QUICK, notes=notes, log=lambda m: None)
    check_rows(rows, LATENCY_KEYS)
    assert sorted((r["sampler"], r["steps"], r["driver"]) for r in rows) == sorted(
        (s, n, d) for s, n in suite.QUICK.latency for d in ("auto", "eager"))
    assert {(r["model"], r["backend"], r["precision"], r["batch"]) for r in rows} == {("digits", "torch", "tf32", 1)}
    assert all(r["ms_per_step"] == pytest.approx(1e3 * r["seconds"] / r["steps"]) for r in rows)
    assert notes == ["latency digits/torch/tf32: python_graph, c_driver, graph_loop skipped: the graph drivers need CUDA"]


def test_throughput_rows_cover_the_batches_and_the_largest(digits):
    notes = []
    m = suite.QUICK
    rows = suite.throughput_rows(digits, "digits", "torch", "fp32", "cpu", m, notes=notes, log=lambda m: None)
    check_rows(rows, THROUGHPUT_KEYS)
    by_batch = {}
    for r in rows:
        by_batch.setdefault(r["batch"], set()).add(r["driver"])
    assert by_batch == {2: {"auto", "eager"}, 4: {"auto", "eager"}, m.largest_cap: {"eager"}}
    for r in rows:
        assert r["steps"] == m.steps and r["largest"] == (r["batch"] == m.largest_cap)
        assert r["steps_measured"] == (m.largest_steps if r["largest"] else m.throughput_steps)
        assert r["images_per_s"] == pytest.approx(r["batch"] / (r["seconds_per_step"] * m.steps))
    assert "the cap" in next(r for r in rows if r["largest"])["largest_limit"]


def test_a_failing_driver_is_noted_and_the_others_are_timed(digits):
    # on the CPU a GraphedSampler runs its step uncaptured: driver "python" works, "c" refuses
    eng = suite.make_engine(digits, "torch", "fp32", "cpu")
    notes = []
    times = suite.time_drivers(eng, "ddim", 2, 3, ["python_graph", "c_driver", "eager"], "cpu", reps=1, warm=False,
                               where="here", notes=notes, log=lambda m: None)
    assert sorted(times) == ["eager", "python_graph"] and all(positive(t) for t in times.values())
    assert len(notes) == 1 and notes[0].startswith("here/c_driver ddim-2 batch 3 failed: BackendUnavailableError")
    eng.close()


class RunsOutAbove(torch.nn.Module):
    """A small UNet that raises CUDA's out-of-memory error for batches above ``limit``."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.net = SeedUNet(1, (8, 16)).eval()

    def forward(self, x, t):
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {x.shape[0]} images")
        return self.net(x, t)


@pytest.mark.parametrize("limit,start,expect", [(20, 2, 16), (5, 16, 4), (1, 2, 1)])
def test_largest_batch_stops_where_memory_runs_out(limit, start, expect):
    from ddpm_engine import Engine

    eng = Engine.from_module(RunsOutAbove(limit), sample_shape=(1, 8, 8), backend="torch", device="cpu")
    assert suite.largest_batch(eng, start, cap=1024, device="cpu") == (expect, f"out of memory at {2 * expect}")
    assert suite.largest_batch(eng, start, cap=expect, device="cpu")[0] == expect
    assert eng.sample([1], steps=2).shape == (1, 1, 8, 8)  # the engine still works afterwards


def test_largest_batch_stops_at_any_error_and_says_which():
    """An error that is not out-of-memory (the engine refusing a size, a failing kernel) stops the
    doubling with the error as the reason instead of ending the section; a model that cannot run
    one image raises."""
    from ddpm_engine import Engine

    class RefusesAbove(RunsOutAbove):
        def forward(self, x, t):
            if x.shape[0] > self.limit:
                raise ValueError(f"batch {x.shape[0]} refused")
            return self.net(x, t)

    eng = Engine.from_module(RefusesAbove(8), sample_shape=(1, 8, 8), backend="torch", device="cpu")
    assert suite.largest_batch(eng, 2, cap=64, device="cpu") == (8, "ValueError: batch 16 refused at 16")
    eng = Engine.from_module(RefusesAbove(0), sample_shape=(1, 8, 8), backend="torch", device="cpu")
    with pytest.raises(RuntimeError, match="one image does not run: ValueError: batch 1 refused"):
        suite.largest_batch(eng, 2, cap=64, device="cpu")


def test_diffusers_peer_rows_with_a_tiny_unet2d():
    diffusers = pytest.importorskip("diffusers")
    from ddpm_engine.checkpoints import from_module
    from ddpm_engine.models.cifar_unet import CIFAR10_SCHEDULER_CONFIG, DiffusersUNet

    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                 layers_per_block=1, norm_num_groups=8).eval()
    loaded = from_module(DiffusersUNet(unet), CIFAR10_SCHEDULER_CONFIG, (1, 8, 8), "tiny")
    assert suite.diffusers_scheduler(loaded).config.variance_type == "fixed_small"
    notes = []
    rows = suite.diffusers_peer_rows(loaded, "tiny", "cpu", batch=2, steps=3, steps_measured=2, precisions=("fp32",),
                                     notes=notes, log=lambda m: None)
    check_rows(rows, PEER_KEYS)
    assert notes == [] and len(rows) == 1
    r = rows[0]
    assert (r["name"], r["precision"], r["batch"], r["steps"], r["steps_measured"]) == (
        "diffusers DDPMPipeline", "fp32", 2, 3, 2)
    assert r["images_per_s"] == pytest.approx(2 / r["seconds"])
    with pytest.raises(TypeError, match="UNet2DModel"):
        suite.diffusers_peer_rows(load("digits"), "digits", "cpu", 1, 3, 3)


def test_compile_peer_rows_run_the_compiled_unet(digits):
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    rows = suite.compile_peer_rows(digits, "digits", "cpu", "bf16", batch=2, steps=3, steps_measured=2,
                                   compilers={"recording": {"backend": recording_backend}}, log=lambda m: None)
    check_rows(rows, PEER_KEYS | {"compile_s"})
    assert graphs, "torch.compile's backend was never called: the peer did not run the compiled module"
    assert [(r["name"], r["precision"], r["steps_measured"]) for r in rows] == [("recording (Python loop)", "bf16", 2)]


def test_section_order_and_the_first_call():
    sections = suite.all_sections()
    names = [s.name for s in sections]
    assert len(set(names)) == len(names)
    first = names[:names.index("peers.b1.compile.bf16") + 1]
    assert first[:2] == ["flops_per_image_step", "matmul_peak_tflops"]
    assert set(first[2:]) == {f"latency.cifar10.torch.{m}" for m in suite.MODES} | {
        "peers.b1.diffusers", "peers.b1.compile.fp32", "peers.b1.compile.bf16"}
    # the first call's sections fit its budget with 30 s to spare for loading the models
    assert sum(s.estimate_s for s in sections[:len(first)]) <= suite.BUDGET_S - 30
    assert [s.name for s in suite.select(sections, ["peers.b1.compile", "flops_per_image_step"])] == [
        "flops_per_image_step", *(f"peers.b1.compile.{m}" for m in ("fp32", "bf16", "fp16", "tf32"))]
    with pytest.raises(ValueError, match="unknown section"):
        suite.select(sections, ["peers.b1.comp"])


@pytest.mark.filterwarnings("ignore::ddpm_engine.errors.EmulatedPrecisionWarning")  # the parity section runs fp16 on this CPU on purpose
def test_main_skips_what_does_not_fit_then_merges_later_calls(tmp_path):
    out = tmp_path / "r.json"
    base = ["--device", "cpu", "--quick", "--models", "digits", "--backends", "torch", "--precisions", "fp32",
            "--out", str(out)]
    expected = ["flops_per_image_step", "matmul_peak_tflops", "latency.digits.torch.fp32",
                "throughput.digits.torch.fp32", "host_us_per_step", "parity.torch"]

    assert suite.main(base + ["--budget-s", "0"]) == 0  # nothing fits
    r = json.loads(out.read_text())
    assert r["sections_done"] == {} and r["sections_left"] == expected
    assert r["runs"][-1]["skipped"] == expected and sum("skipped" in n and "--budget-s" in n for n in r["notes"]) == 6

    assert suite.main(base + ["--sections", "latency,flops_per_image_step"]) == 0
    r = json.loads(out.read_text())
    assert sorted(r["sections_done"]) == ["flops_per_image_step", "latency.digits.torch.fp32"]
    assert r["sections_left"] == [n for n in expected if n not in r["sections_done"]]
    assert positive(r["flops_per_image_step"]["digits"])
    n_latency = len(r["latency"])
    assert n_latency == 2 * len(suite.QUICK.latency) and {x["section"] for x in r["latency"]} == {"latency.digits.torch.fp32"}

    assert suite.main(base) == 0  # the rest
    r = json.loads(out.read_text())
    assert sorted(r["sections_done"]) == sorted(expected) and r["sections_left"] == []
    assert len(r["latency"]) == n_latency and r["throughput"] and r["parity"] and positive(r["matmul_peak_tflops"])
    assert [run["ran"] for run in r["runs"]] == [[], ["flops_per_image_step", "latency.digits.torch.fp32"], expected[1:2] +
                                                 expected[3:]]
    assert not r.get("errors"), r.get("errors")

    assert suite.main(base + ["--sections", "latency.digits.torch.fp32"]) == 0  # run again: rows replaced
    r2 = json.loads(out.read_text())
    assert len(r2["latency"]) == n_latency and r2["latency"] != r["latency"]
    md = (tmp_path / "r.md").read_text()
    assert all(f"## {title}" in md for title in ("Latency", "Throughput", "Parity", "Host time per step"))
    with pytest.raises(SystemExit):
        suite.main(base + ["--sections", "no.such.section"])
