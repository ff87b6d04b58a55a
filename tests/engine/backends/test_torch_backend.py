"""The eager torch backend: a private copy of the module, and a contiguous float32 output in every
memory format, so the fused Triton step (which indexes flat buffers) takes it. On CUDA the module
runs in channels_last, where a 3-channel model's output has channels-last strides; here the same
layout is forced on the CPU and the output goes through the Triton step in its interpreter. On the
CPU the layout is measured (a fake timer here, never wall time) and the verdict cached."""

import json
import random

import pytest
import torch

from ddpm_engine import Engine, backends
from ddpm_engine.backends import timing, torch_backend
from ddpm_engine.backends.torch_backend import TorchBackend
from ddpm_engine.checkpoints import from_module
from ddpm_engine.models import SeedUNet

SHAPE = (3, 8, 8)


@pytest.fixture
def rgb_model():
    seed = random.getrandbits(31)
    torch.manual_seed(seed)
    return seed, from_module(SeedUNet(3, (8, 16)).eval(), {"clip_sample": True}, SHAPE, name="rgb")


def test_channels_last_output_is_contiguous_and_equal(rgb_model):
    seed, loaded = rgb_model
    plain = TorchBackend(loaded.module, "cpu", channels_last=False)
    cl = TorchBackend(loaded.module, "cpu", channels_last=True)
    assert not plain.channels_last and cl.channels_last
    x, t = torch.randn(2, *SHAPE), torch.randint(0, 1000, (2,))
    with torch.inference_mode():
        raw = cl.module(x, t)
    assert not raw.is_contiguous(), "the forced layout did not reproduce channels-last output"
    out = cl(x, t)
    assert out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out, plain(x, t), rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    assert next(loaded.module.parameters()).is_contiguous()  # the caller's module is untouched


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_channels_last_rgb_model_runs_through_the_triton_step(rgb_model, precision):
    pytest.importorskip("triton")
    seed, loaded = rgb_model
    seeds = [random.getrandbits(64) for _ in range(2)]
    ref = Engine(loaded, backend="torch", device="cpu", precision=precision, step_impl="torch")
    fast = Engine(loaded, backend="torch", device="cpu", precision=precision, step_impl="triton")
    fast.backend = TorchBackend(loaded.module, "cpu", precision, channels_last=True)
    want = ref.sample(seeds, sampler="ddpm", steps=3)
    got = fast.sample(seeds, sampler="ddpm", steps=3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=f"seed {seed}, seeds {seeds}")


@pytest.fixture
def layout_timer(monkeypatch):
    """timing.time_call replaced: a call takes ``ms[layout]`` per image; records (layout, batch)."""
    ms, calls = {}, []

    def fake(backend, x, t):
        layout = "channels_last" if backend.channels_last else "nchw"
        calls.append((layout, x.shape[0]))
        return ms[layout] * x.shape[0] / 1e3

    monkeypatch.setattr(timing, "time_call", fake)
    return ms, calls


def test_built_directly_on_the_cpu_it_runs_nchw(rgb_model):
    assert not TorchBackend(rgb_model[1].module, "cpu").channels_last


@pytest.mark.parametrize("faster", ["nchw", "channels_last"])
def test_the_cpu_layout_is_measured_once_and_the_faster_kept(rgb_model, layout_timer, cache, faster):
    _, loaded = rgb_model
    ms, calls = layout_timer
    ms.update({"nchw": 2.0, "channels_last": 2.0, faster: 1.0})
    backend = backends.create("torch", loaded, "cpu", "fp32")
    assert backend.channels_last == (faster == "channels_last")
    assert {layout for layout, _ in calls} == {"nchw", "channels_last"}
    assert len(calls) == 2 * 2 * timing.ROUNDS
    assert Engine(loaded, backend="torch", device="cpu").backend.channels_last == (faster == "channels_last")
    assert len(calls) == 2 * 2 * timing.ROUNDS  # the cached verdict measured nothing
    verdict, built = torch_backend.choose_layout(loaded, "fp32")
    assert (verdict.choice, verdict.source, built) == (faster, "cached", None)
    assert verdict.ms[faster] == {1: 1.0, timing.TYPICAL_BATCH: 1.0 * timing.TYPICAL_BATCH}


def test_a_tie_keeps_nchw_and_a_corrupt_verdict_measures_again(rgb_model, layout_timer, cache):
    _, loaded = rgb_model
    ms, calls = layout_timer
    ms.update({"nchw": 1.0, "channels_last": 1.0})
    assert not backends.create("torch", loaded, "cpu", "bf16").channels_last
    path = torch_backend.layout_path(loaded, "bf16")
    path.write_text(json.dumps({"choice": "sideways", "source": "measured", "precision": "bf16", "ms": {}}))
    ms["channels_last"] = 0.5
    n = len(calls)
    assert backends.create("torch", loaded, "cpu", "bf16").channels_last
    assert len(calls) == 2 * n
    assert torch_backend.choose_layout(loaded, "fp32")[0] is not None  # another precision: its own verdict
    assert len(calls) == 3 * n


def test_a_model_that_fails_the_probe_runs_nchw_unmeasured(cache):
    class RefusesBatches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = SeedUNet(1, (4, 8)).eval()

        def forward(self, x, t):
            if x.shape[0] > 2:
                raise ValueError(f"batch {x.shape[0]} refused")
            return self.net(x, t)

    loaded = from_module(RefusesBatches(), {}, (1, 8, 8), name="refuses")
    backend = backends.create("torch", loaded, "cpu", "fp32")
    assert not backend.channels_last
    verdict, _ = torch_backend.choose_layout(loaded, "fp32")
    assert verdict.source == f"unmeasured: ValueError: batch {timing.TYPICAL_BATCH} refused"
    assert not torch_backend.layout_path(loaded, "fp32").exists()  # nothing cached: measured again next time
    assert backend(torch.randn(2, 1, 8, 8), torch.tensor([3, 4])).shape == (2, 1, 8, 8)
