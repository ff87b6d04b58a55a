"""The openvino backend's int8: a graph quantized by NNCF on the model's own trajectories, with the
layers of ``KEEP_FLOAT`` left in floating point (found from the graph), cached and rebuilt like the
other artifacts, and refused with the reason where it cannot run."""

import collections
import json
import random
import sys

import pytest
import torch

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from ddpm_engine import Engine, backends, calibration, testing  # noqa: E402
from ddpm_engine.backends import auto, openvino_backend  # noqa: E402
from ddpm_engine.backends.openvino_backend import KEEP_FLOAT, float_groups  # noqa: E402
from ddpm_engine.checkpoints import from_module  # noqa: E402
from ddpm_engine.errors import BackendUnavailableError, MissingDependencyError  # noqa: E402

from .helpers import SHAPE, small_model  # noqa: E402

FEW = dict(calibration.SETTINGS, calls=40)  # a shorter calibration: the tests' models are small


@pytest.fixture(scope="module")
def loaded():
    return small_model(widths=(8, 16))


@pytest.fixture(scope="module")
def int8(loaded, cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(calibration, "SETTINGS", FEW)
        yield backends.create("openvino", loaded, "cpu", "int8")


def _network_errors(loaded, backend, seed):
    """max|out - eager| / max|eager| per call along a held-out trajectory (not the calibration's)."""
    errors = []
    for x, t in calibration.record(loaded, dict(FEW, calls=20, seed=seed)):
        with torch.inference_mode():
            want = loaded.module(x, t)
        errors.append(float((backend(x, t) - want).abs().max() / want.abs().max()))
    return errors


def test_int8_runs_integer_kernels_and_stays_near_eager(loaded, int8, test_seed):
    runtime = collections.Counter(
        (op.get_rt_info()["layerType"].astype(str), op.get_rt_info()["runtimePrecision"].astype(str))
        for op in int8.compiled.get_runtime_model().get_ordered_ops())
    assert runtime[("Convolution", "u8")] + runtime[("Convolution", "i8")] >= 2, runtime  # int8 convolutions
    assert runtime[("Convolution", "f32")] == 2, runtime  # the first and the last, kept in floating point
    errors = _network_errors(loaded, int8, test_seed + 1)
    assert 1e-4 < max(errors), "no quantization error at all: is this the fp32 graph?"
    assert sorted(errors)[len(errors) // 2] < 0.2, errors  # the median call
    assert int8.precision == "int8" and int8.dtype == torch.float32 and "int8" in int8.path.name


def test_the_float_groups_are_found_from_the_graph(loaded, int8):
    core = openvino_backend._ov().Core()
    groups = float_groups(openvino_backend.onnx_model(core, loaded))
    assert groups["first_last_conv"] == ["/inc/inc.0/Conv/WithoutBiases", "/out/Conv/WithoutBiases"]
    assert groups["time_embedding"] and all(n.startswith(("/te_down", "/te_up")) for n in groups["time_embedding"])
    assert groups["attention"] == []  # a SeedUNet has none
    assert groups["skip_concat"] == ["/ups.0/conv/conv.0/Conv/WithoutBiases"]  # the decoder's one level
    kept = {n for g in KEEP_FLOAT for n in groups[g]}
    quantized = openvino_backend.int8_model(core, loaded)
    fed_by_quantizer = {op.get_friendly_name(): any(p.get_type_name() == "FakeQuantize"
                                                    for p in openvino_backend._producers(op))
                        for op in quantized.get_ordered_ops() if op.get_type_name() in openvino_backend.QUANTIZABLE}
    assert not any(fed_by_quantizer[n] for n in kept)
    assert sum(fed_by_quantizer.values()) >= 2  # every other convolution takes int8 inputs


def test_attention_is_the_matmuls_around_softmax():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(random.getrandbits(31))
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=8)
    from ddpm_engine.models.cifar_unet import DiffusersUNet

    loaded = from_module(DiffusersUNet(unet.eval()), None, SHAPE, name="attn")
    model = openvino_backend.onnx_model(openvino_backend._ov().Core(), loaded)
    groups = float_groups(model)
    softmaxes = [op for op in model.get_ordered_ops() if op.get_type_name().startswith("Softmax")]
    assert len(softmaxes) == 4  # down, mid and the up block's two layers
    assert len(groups["attention"]) == 2 * len(softmaxes), groups["attention"]
    assert all("/attentions." in n and "/to_" not in n for n in groups["attention"])  # q.k and weights.v
    assert all(n.startswith("/unet/time_embedding") or "time_emb_proj" in n for n in groups["time_embedding"])
    assert groups["first_last_conv"] == ["/unet/conv_in/Conv/WithoutBiases", "/unet/conv_out/Conv/WithoutBiases"]


def test_the_int8_graph_is_cached_and_rebuilt_for_another_nncf(loaded, int8, monkeypatch):
    monkeypatch.setattr(calibration, "SETTINGS", FEW)
    path = openvino_backend.int8_path(loaded)
    assert path.exists() and json.loads(path.open("rb").readline())["nncf"] == backends.versions(["nncf"])["nncf"]

    def no_quantize(*args, **kwargs):
        raise AssertionError("quantized again")

    with monkeypatch.context() as mp:
        mp.setattr(openvino_backend, "quantize", no_quantize)
        int8.path.unlink()  # the compiled blob: recompiled from the cached int8 graph, not re-quantized
        backends.create("openvino", loaded, "cpu", "int8")
    header, _, rest = path.read_bytes().partition(b"\n")
    path.write_bytes(json.dumps(dict(json.loads(header), nncf="2.0.0")).encode() + b"\n" + rest)
    calls = []
    real = openvino_backend.quantize
    monkeypatch.setattr(openvino_backend, "quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    openvino_backend.int8_model(openvino_backend._ov().Core(), loaded)
    assert calls == [1] and json.loads(path.open("rb").readline())["nncf"] != "2.0.0"
    monkeypatch.setattr(calibration, "SETTINGS", dict(FEW, seed=1))
    assert openvino_backend.int8_path(loaded) != path  # other calibration settings: another graph


def test_calibration_follows_a_trajectory_over_all_timesteps(loaded, test_seed):
    calls = calibration.record(loaded, dict(FEW, seed=test_seed))
    t = torch.stack([c[1][0] for c in calls])
    assert len(calls) == FEW["calls"] and all(c[0].shape == (FEW["batch"], *SHAPE) for c in calls)
    assert t[0] >= 1000 - 1000 // FEW["calls"] and t[-1] <= 1000 // FEW["calls"] and bool((t[1:] < t[:-1]).all())
    assert calls[0][0].std() > 0.5 and not torch.equal(calls[0][0], calls[1][0])  # noise first, then the steps


def test_int8_is_refused_where_it_cannot_run(loaded, monkeypatch):
    for name in ("torch", "onnxruntime"):
        reason = backends.available("cpu", "int8", [name])[name]
        assert "no int8" in reason and "openvino" in reason
        with pytest.raises(BackendUnavailableError, match="no int8"):
            Engine(loaded, backend=name, device="cpu", precision="int8")
    assert auto.decide(loaded, "cpu", "int8")[0].choice == "openvino"  # the only candidate that has it
    assert backends.parse_precision("int8") is None
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    assert "pip install nncf" in openvino_backend.OpenVINOBackend.unavailable_reason("cpu", "int8")
    assert openvino_backend.OpenVINOBackend.unavailable_reason("cpu", "fp32") is None
    with pytest.raises(BackendUnavailableError, match="ddpm-engine\\[int8\\]"):
        Engine(loaded, backend="openvino", device="cpu", precision="int8")
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(MissingDependencyError, match="'nncf'.*ddpm-engine\\[int8\\]"):
        openvino_backend._nncf()


def test_compare_reports_int8_against_eager_fp32(loaded, int8, monkeypatch):
    monkeypatch.setattr(calibration, "SETTINGS", FEW)
    report = testing.compare(loaded, backends=["openvino"], precision="int8", sampler="ddim", steps=10, seeds=[0, 1])
    (result,) = report.results
    assert (result.backend, result.precision) == ("openvino", "int8")
    assert 1e-4 < result.network_error < float("inf") and 0 < result.image_psnr_db < float("inf")
    assert "int8" in str(report)


def test_int8_refuses_a_model_with_extra_inputs(cache):
    """The calibration records (x, t) calls only: a class-conditional model is refused at load, saying
    which inputs and what to use."""
    class WithLabels(torch.nn.Module):
        num_classes = 3

        def __init__(self):
            super().__init__()
            self.conv, self.embed = torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Embedding(3, 1)

        def forward(self, x, t, y):
            return self.conv(x) + self.embed(y)[:, :, None, None]

    loaded = from_module(WithLabels(), sample_shape=(1, 8, 8))
    assert loaded.io.extra_inputs
    with pytest.raises(BackendUnavailableError, match="calibrates on \\(x, t\\).*bf16"):
        Engine(loaded, backend="openvino", device="cpu", precision="int8")
