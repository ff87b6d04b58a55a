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
from ddpm_engine.samplers import DDPMSampler  # noqa: E402

from .helpers import SHAPE, rel_err, small_model  # noqa: E402

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


def test_no_activation_range_clips_a_calibration_call(loaded, int8):
    """Each activation quantizer's range holds every value its input took on the calibration calls
    (``ACTIVATION_RANGE`` "minmax"): NNCF's default, the mean over the calls of each call's extremes,
    clipped the noisier timesteps' activations and biased the network."""
    core = openvino_backend._ov().Core()
    quantized = openvino_backend.int8_model(core, loaded)
    ranges = {}
    for fq in (op for op in quantized.get_ordered_ops() if op.get_type_name() == "FakeQuantize"):
        source = fq.input(0).get_source_output().get_node()
        if source.get_type_name() not in ("Constant", "Convert"):  # an activation's, not a weight's
            low, high = (float(fq.input(k).get_source_output().get_node().get_data().item()) for k in (1, 2))
            ranges[source.get_friendly_name()] = (low, high)
    assert len(ranges) >= 2, ranges
    model = openvino_backend.onnx_model(core, loaded)  # the fp32 graph the ranges were measured on
    nodes = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    model.add_outputs([nodes[name].output(0) for name in ranges])
    compiled = core.compile_model(model, "CPU", openvino_backend.config("fp32"))
    seen = {name: [float("inf"), float("-inf")] for name in ranges}
    for x, t in calibration.record(loaded, FEW):
        out = compiled([x.numpy(), t.numpy()])
        for k, name in enumerate(ranges, start=1):
            v = out[compiled.outputs[k]]
            seen[name] = [min(seen[name][0], float(v.min())), max(seen[name][1], float(v.max()))]
    for name, (low, high) in ranges.items():
        span = high - low
        assert low <= seen[name][0] + 1e-3 * span, (name, (low, high), seen[name])
        assert seen[name][1] <= high + 1e-3 * span, (name, (low, high), seen[name])


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
    monkeypatch.setattr(calibration, "SETTINGS", FEW)
    monkeypatch.setattr(openvino_backend, "ACTIVATION_RANGE", "mean_minmax")
    assert openvino_backend.int8_path(loaded) != path  # another range estimator: another graph


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


class WithLabels(torch.nn.Module):
    """forward(x, t, y): guided-diffusion's signature, three classes, label 2 for "no class"."""

    num_classes, null_label = 3, 2

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv3, self.conv4 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 1, 3, padding=1)
        self.embed = torch.nn.Embedding(3, 8)

    def forward(self, x, t, y):
        scale = torch.cos(t.float() / 300)[:, None, None, None]
        h = torch.relu(self.conv1(x)) + self.embed(y)[:, :, None, None] * scale
        # the skip keeps the output's scale whatever the random weights: without it, about one
        # seed in 15 gave an output so small that int8's error failed the load check (0.48 > 0.25)
        return x + self.conv4(torch.relu(self.conv3(torch.relu(self.conv2(h)))))


class SelfConditioned(torch.nn.Module):
    """lucidrains' Unet(self_condition=True) signature: forward(x, time, x_self_cond)."""

    self_condition = True

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x, time, x_self_cond=None):
        return self.conv(torch.cat([x, x_self_cond], dim=1)) * torch.cos(time.float() / 300)[:, None, None, None]


def test_calibration_records_the_labels_and_the_previous_x0_as_sampling_feeds_them(test_seed):
    torch.manual_seed(test_seed)
    labelled = from_module(WithLabels().eval(), sample_shape=SHAPE)
    calls = calibration.record(labelled, dict(FEW, batch=16, seed=test_seed))
    assert all(len(c) == 3 and c[2].dtype == torch.int64 and c[2].shape == (16,) for c in calls)
    labels = calls[0][2]
    assert all(torch.equal(c[2], labels) for c in calls)  # a row keeps its label along its trajectory
    assert set(labels.tolist()) <= {0, 1, 2} and len(set(labels.tolist())) > 1  # null label 2 among them
    conditioned = from_module(SelfConditioned().eval(), sample_shape=SHAPE)
    calls = calibration.record(conditioned, dict(FEW, seed=test_seed))
    assert all(len(c) == 3 and c[2].shape == c[0].shape for c in calls)
    assert not calls[0][2].any()  # no x0 estimate before the first step (plan.reverse_step: zeros)
    cfg = conditioned.scheduler
    sampler = DDPMSampler(cfg.betas(), variance_type=cfg.variance_type,
                          prediction_type=cfg.prediction_type, clip_sample=cfg.clip_sample, steps=FEW["calls"])
    with torch.inference_mode():  # the second call's x_self_cond is the first step's x0, from the first call's output
        x, t, x0 = calls[0]
        want = sampler.step(conditioned.module(x, t, x0).float(), t, x, noise=torch.zeros_like(x)).pred_original_sample
    torch.testing.assert_close(calls[1][2], want)


def test_int8_runs_a_class_conditional_model_calibrated_on_its_labels(cache, monkeypatch, test_seed):
    """A model with extra inputs is quantized from calls that carry them, and serves labels."""
    monkeypatch.setattr(calibration, "SETTINGS", FEW)
    torch.manual_seed(test_seed)
    loaded = from_module(WithLabels().eval(), sample_shape=SHAPE, name="labelled")
    seen = []
    real = openvino_backend.quantize
    monkeypatch.setattr(openvino_backend, "quantize",
                        lambda model, calls, **k: seen.extend(calls) or real(model, calls, **k))
    engine = Engine(loaded, backend="openvino", device="cpu", precision="int8")
    assert seen and all(len(c) == 3 for c in seen)  # calibrated on (x, t, labels)
    x, t, y = calibration.record(loaded, dict(FEW, calls=10, seed=test_seed + 1))[-5]
    with torch.inference_mode():
        want = loaded.module(x, t, y)
    assert 1e-4 < rel_err(engine.backend(x, t, y), want) < 0.2
    images = engine.sample([1, 2], sampler="ddim", steps=4, class_labels=[0, 1])
    assert images.shape == (2, *SHAPE) and bool(images.isfinite().all())
