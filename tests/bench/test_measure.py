"""bench/measure.py on the CPU: the bench precisions set and restore torch's flags; a failing driver
is noted and the others timed; the host's cost per step drives the graphed sampler's API (a
stand-in here)."""

import pytest
import torch

from bench import measure
from ddpm_engine.checkpoints import load


def test_the_bench_precisions_are_the_engines_and_tf32():
    from ddpm_engine.backends import PRECISIONS

    assert set(measure.MODES) == {*PRECISIONS, "tf32"}
    assert [measure.engine_precision(m) for m in measure.MODES] == [*PRECISIONS, "fp32"]


@pytest.mark.parametrize("mode", measure.MODES)
def test_math_mode_sets_tf32_for_tf32_only_and_restores_the_flags(mode):
    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32")
    for start in (False, True):
        for obj, name in flags:
            setattr(obj, name, start)
        with pytest.raises(RuntimeError, match="inside"), measure.math_mode(mode):
            assert [getattr(o, n) for o, n in flags] == [mode == "tf32"] * 2
            raise RuntimeError("inside")
        assert [getattr(o, n) for o, n in flags] == [start] * 2
    with pytest.raises(ValueError, match="bench precision"):
        measure.math_mode("tf16")


def test_exact_fp32_turns_tf32_off_and_cudnn_deterministic():
    before = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32
    with measure.exact_fp32():
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (True, False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        with measure.math_mode("tf32"):  # nested: TF32 on, determinism kept
            assert torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.deterministic
        assert not torch.backends.cudnn.allow_tf32
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32) == before


def test_a_failing_driver_is_noted_and_the_others_are_timed():
    # on the CPU a GraphedSampler runs its step uncaptured: driver "python" works, "c" refuses
    with measure.built(load("digits"), "torch", "fp32", "cpu") as eng:
        notes = []
        assert measure.usable(eng, ["python", "c", "eager"], notes, "here") == ["eager"]
        assert notes.pop() == "here: python, c skipped: the graph drivers need CUDA"
        times = measure.time_drivers(eng, "ddim", 2, 3, ["python", "c", "eager"], reps=1, warm=False, notes=notes)
    assert sorted(times) == ["eager", "python"] and all(t > 0 for t in times.values())
    assert len(notes) == 1 and notes[0].startswith("c ddim-2 batch 3 failed: BackendUnavailableError")


class FakeGraphed:
    """What engine.graphed(...) returns, as far as host_us_per_step uses it."""

    steps = 7

    def __init__(self):
        self.runs, self.replays = [], 0
        self.graph = type("Graph", (), {"replay": lambda _: setattr(self, "replays", self.replays + 1)})()

    def run(self, seeds, driver):
        self.runs.append((tuple(seeds), driver))

    def bucket(self, n):
        return type("Bucket", (), {"graph": self.graph, "size": n})()


@pytest.mark.parametrize("driver", ["python", "c"])
def test_host_us_per_step_drives_the_graphed_api(monkeypatch, driver):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(1))
    g = FakeGraphed()
    res = measure.host_us_per_step(g, [4, 5], driver, reps=3)
    assert g.runs == [((4, 5), driver)] * 4  # one warm run, then reps
    assert res["driver"] == driver and res["steps"] == 7 and res["batch"] == 2
    if driver == "python":  # the enqueue-only timing replays the bucket's graph once per step, no sync inside
        assert g.replays == 7 and "enqueue_us_per_step" in res and len(syncs) == 2
    else:
        assert g.replays == 0 and "enqueue_us_per_step" not in res


def test_flops_per_image_step_of_the_cifar_unet():
    pytest.importorskip("diffusers")
    flops = measure.flops_per_image_step(measure.cifar_loaded())
    # 11.95 GFLOP with torch 2.13: convolutions 11.42, linear 0.38, attention 0.15 (multiply-add = 2)
    assert 11.5e9 < flops < 12.5e9
