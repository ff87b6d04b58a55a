"""The eager torch backend: a private copy of the module, and a contiguous float32 output in every
memory format, so the fused Triton step (which indexes flat buffers) takes it. On CUDA the module
runs in channels_last, where a 3-channel model's output has channels-last strides; here the same
layout is forced on the CPU and the output goes through the Triton step in its interpreter."""

import random

import pytest
import torch

from ddpm_engine import Engine
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
