"""Every model is checked once at load (engine/probe.py): its output kind and shape, the inputs
it takes, and every exported or cached graph against the eager module; the cache key sees the
model's code; symbolic graph axes are checked by value and named by their own names."""

import dataclasses
import importlib.util
import json
import types
import warnings

import pytest
import torch
from torch import nn

from ddpm_engine import Engine, ModelLoadError, SchedulerConfig, cache, checkpoints, probe
from ddpm_engine.export import iospec

SHAPE = (1, 8, 8)
SEEDS = [3, 11]


class Net(nn.Module):
    """A tiny network whose output depends on t; ``kind`` picks what its forward returns."""

    def __init__(self, kind="tensor", out_channels=1):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(1, out_channels, 3, padding=1)

    def forward(self, x, t):
        out = self.conv(x) * torch.cos(t.float() / 300)[:, None, None, None]
        return {"tensor": out, "tuple": (out,), "dict": {"sample": out}}[self.kind]


class BranchesOnT(Net):
    """A forward that branches in Python on t: a tracer freezes the branch of its example."""

    def forward(self, x, t):
        out = super().forward(x, t)
        if t[0] > 500:
            return out
        return -out


class Doubled(Net):
    """``Net`` with its forward edited: twice the output."""

    def forward(self, x, t):
        return 2 * super().forward(x, t)


def fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))


@pytest.mark.parametrize("kind", ["tuple", "dict", "unet2doutput"])
def test_every_output_kind_gives_the_images_of_a_plain_tensor_on_every_backend(kind, tmp_path, monkeypatch):
    fresh_cache(monkeypatch, tmp_path)
    plain = Net("tensor").eval()
    if kind == "unet2doutput":
        outputs = pytest.importorskip("diffusers.models.unets.unet_2d")
        module = Net("tensor")
        module.load_state_dict(plain.state_dict())
        module.forward = types.MethodType(lambda self, x, t: outputs.UNet2DOutput(sample=Net.forward(self, x, t)),
                                          module)
    else:
        module = Net(kind)
        module.load_state_dict(plain.state_dict())
    want = Engine.from_module(plain, sample_shape=SHAPE, backend="torch").sample(SEEDS, sampler="ddim", steps=4)
    for backend in ("torch", "onnxruntime"):
        engine = Engine.from_module(module, sample_shape=SHAPE, backend=backend)
        assert engine.model.io.output_kind == ("dict" if kind == "unet2doutput" else kind)
        got = engine.sample(SEEDS, sampler="ddim", steps=4)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=backend)


def test_an_output_it_cannot_read_is_refused_at_load():
    class Pair(Net):
        def forward(self, x, t):
            return super().forward(x, t), x

    with pytest.raises(ModelLoadError, match="returned a tuple; the engine takes a tensor, a 1-tuple"):
        checkpoints.from_module(Pair(), sample_shape=SHAPE)


def test_2c_output_channels_with_a_fixed_variance_are_refused_at_load_saying_what_to_set():
    with pytest.raises(ModelLoadError, match="outputs 2 channels .* set variance_type='learned_range'"):
        checkpoints.from_module(Net(out_channels=2), {"variance_type": "fixed_small"}, SHAPE)


def test_an_output_of_the_wrong_shape_is_refused_at_load():
    with pytest.raises(ModelLoadError, match=r"returned shape \(2, 3, 8, 8\) .* expected \(2, 1, 8, 8\)"):
        checkpoints.from_module(Net(out_channels=3), sample_shape=SHAPE)


def test_a_forward_that_fails_on_the_probe_is_refused_at_load_with_its_error():
    with pytest.raises(ModelLoadError, match="failed on a probe batch .*RuntimeError"):
        checkpoints.from_module(Net(), sample_shape=(3, 8, 8))  # a 1-channel conv given 3 channels


def test_a_learned_variance_model_is_probed_for_2c_channels_and_exports_them(tmp_path):
    """2C output channels with a learned variance (the scheduler config's variance_type) pass the
    probe, and the ONNX graph's output has 2C channels (the step that uses them is
    samplers.ddpm_step's)."""
    from ddpm_engine.backends.onnxruntime_backend import OnnxRuntimeBackend
    from ddpm_engine.export.onnx_export import export_onnx

    learned = types.SimpleNamespace(variance_type="learned_range", num_train_timesteps=1000)
    module, io = probe.inspect(Net(out_channels=2).eval(), learned, SHAPE)
    assert io.out_channels == 2 and [p[-1].shape for p in io.graph_probes()] == [(2, 2, 8, 8), (1, 2, 8, 8)]
    with pytest.raises(ModelLoadError, match=r"expected \(2, 2, 8, 8\)"):
        probe.inspect(Net(out_channels=1).eval(), learned, SHAPE)
    loaded = checkpoints.LoadedModel(module, learned, SHAPE, "learned", checkpoints.weights_hash(module), io)
    path = export_onnx(loaded, tmp_path / "m.onnx")
    backend = OnnxRuntimeBackend(path, expected_hash=loaded.weights_hash, expected_shape=SHAPE, io=io)
    probe.check_graph(backend, io, "learned")
    assert backend.out_channels == 2


def test_a_forward_that_branches_on_t_is_refused_by_the_traced_backends_and_runs_on_torch(tmp_path, monkeypatch):
    fresh_cache(monkeypatch, tmp_path)
    Engine.from_module(BranchesOnT(), sample_shape=SHAPE, backend="torch").sample(SEEDS, sampler="ddim", steps=2)
    for backend in ("onnxruntime", "openvino"):
        with pytest.raises(ModelLoadError, match="traced control flow"):
            Engine.from_module(BranchesOnT(), sample_shape=SHAPE, backend=backend)
    assert not list((tmp_path / "onnx").glob("*.onnx"))  # the wrong graph is not left to be served later


def test_a_stale_cached_graph_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    """A graph of other code at the model's cache path (as an edit the key cannot see would
    leave) is caught before it serves, removed and exported again."""
    from ddpm_engine.export import onnx_export

    fresh_cache(monkeypatch, tmp_path)
    loaded = checkpoints.from_module(Net(), sample_shape=SHAPE, name="net")
    edited = Doubled()
    edited.load_state_dict(loaded.module.state_dict())  # the same weights, other code
    onnx_export.export_onnx(dataclasses.replace(loaded, module=edited), path=onnx_export.cached_path(loaded))
    with pytest.warns(RuntimeWarning, match="stale cache"):
        engine = Engine.from_pretrained(loaded, backend="onnxruntime")
    want = Engine.from_pretrained(loaded, backend="torch").sample(SEEDS, sampler="ddim", steps=3)
    torch.testing.assert_close(engine.sample(SEEDS, sampler="ddim", steps=3), want, atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Engine.from_pretrained(loaded, backend="onnxruntime")  # the rebuilt file is served as is


def _module_from_file(path, source: str):
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Edited()


EDITED = """
import torch
from torch import nn


class Edited(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x) * {factor}
"""


def test_the_cache_key_sees_the_forwards_code_not_only_weights_and_repr(tmp_path):
    from ddpm_engine.export.onnx_export import cached_path

    a = _module_from_file(tmp_path / "edited_a.py", EDITED.format(factor="1.0"))
    b = _module_from_file(tmp_path / "edited_b.py", EDITED.format(factor="2.0"))
    b.load_state_dict(a.state_dict())
    assert repr(a) == repr(b) and checkpoints.weights_hash(a) == checkpoints.weights_hash(b)
    assert cache.module_code(a) != cache.module_code(b)
    la, lb = (checkpoints.from_module(m, sample_shape=SHAPE, name="edited") for m in (a, b))
    assert cached_path(la) != cached_path(lb)
    same = _module_from_file(tmp_path / "edited_c.py", EDITED.format(factor="1.0"))
    assert cache.module_code(same) == cache.module_code(a)  # the code, not the file's name or place


def test_code_without_a_source_file_is_keyed_by_its_bytecode():
    classes = []
    for factor in ("1.0", "2.0", "1.0"):
        scope = {"__name__": "no_file"}
        exec(EDITED.format(factor=factor), scope)
        classes.append(scope["Edited"]())
    one, two, again = (cache.module_code(m) for m in classes)
    assert one != two and one == again


def test_symbolic_axes_are_accepted_by_value_and_reported_by_their_own_names():
    spec_in = [("sample", "float32", ("batch", 1, "height", "width")), ("timestep", "int64", ("batch",))]
    spec_out = [("model_output", "float32", ("batch", 1, "height", "width"))]
    assert iospec.mismatches(spec_in, spec_out, SHAPE) == []
    frozen = [("sample", "float32", (2, 1, "height", "width")), ("timestep", "int64", ("batch",))]
    problems = iospec.mismatches(frozen, spec_out, SHAPE)
    assert problems == ["input 'sample' has shape [2, 1, height, width], expected [batch, 1, 8, 8]"]
    wrong = [("model_output", "float32", ("batch", 3, "h_out", 8))]
    assert iospec.mismatches(spec_in, wrong, SHAPE) == [
        "output 'model_output' has shape [batch, 3, h_out, 8], expected [batch, 1, 8, 8]"]


def test_a_graph_with_symbolic_height_and_width_loads_and_matches(tmp_path):
    """lucidrains' Unet exports with H and W symbolic: the graph is right and must load."""
    import onnx

    from ddpm_engine.backends.onnxruntime_backend import OnnxRuntimeBackend

    loaded = checkpoints.from_module(Net(), sample_shape=SHAPE)
    x, t = torch.randn(2, *SHAPE), torch.tensor([999, 0])
    path = tmp_path / "sym.onnx"
    axes = {"sample": {0: "batch", 2: "height", 3: "width"}, "timestep": {0: "batch"},
            "model_output": {0: "batch", 2: "height", 3: "width"}}
    torch.onnx.export(loaded.module, (x, t), str(path), input_names=["sample", "timestep"],
                      output_names=["model_output"], dynamic_axes=axes, dynamo=False)
    model = onnx.load(str(path))
    for key, value in iospec.metadata(loaded.weights_hash, SHAPE, "torchscript").items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    assert iospec.from_onnx(model)[0][0] == ("sample", "float32", ("batch", 1, "height", "width"))
    backend = OnnxRuntimeBackend(path, expected_hash=loaded.weights_hash, expected_shape=SHAPE, io=loaded.io)
    assert backend.sample_shape == SHAPE
    probe.check_graph(backend, loaded.io, "sym")


def test_a_single_diffusers_folder_without_scheduler_config_names_the_missing_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "_diffusers_version": "0.30"}))
    with pytest.raises(ModelLoadError, match="no .*scheduler_config.json: the scheduler config"):
        checkpoints.load(tmp_path)


def test_a_forward_with_labels_is_detected_and_probed_with_them():
    class Labelled(Net):
        num_classes = 5

        def forward(self, x, t, y):
            return super().forward(x, t) + y[:, None, None, None].float()

    loaded = checkpoints.from_module(Labelled(), sample_shape=SHAPE)
    assert loaded.io.inputs == ("sample", "timestep", "class_labels") and loaded.io.num_classes == 5
    assert loaded.io.probes[0][2].tolist() == [4, 0]
    optional = checkpoints.from_module(Net(), sample_shape=SHAPE)
    assert optional.io.inputs == ("sample", "timestep") and not optional.io.takes_labels


def test_the_scheduler_config_is_unchanged_by_the_probe():
    sched = SchedulerConfig(clip_sample=False)
    loaded = checkpoints.from_module(Net(), sched, SHAPE)
    assert loaded.scheduler is sched and loaded.io.module_id == id(loaded.module)


def test_peak_bytes_counts_live_storages_not_views_or_freed_ones():
    with torch.inference_mode(), probe.PeakBytes() as peak:
        a = torch.ones(1000)  # 4000 bytes
        b = torch.ones(2000)  # + 8000
        views = a[10:], b.view(40, 50), a.add_(1)  # views and in-place results: nothing new
        assert peak.live == 12000
        del views, a  # a's storage lives while a view of it does
        c = torch.ones(500)  # 2000 bytes, after a's 4000 were freed
        assert peak.live == 10000
    assert peak.peak == 12000
    del b, c


class Wide(Net):
    """A model whose call holds a [B, 512, H, W] intermediate: 512 times its input, per image."""

    def forward(self, x, t):
        wide = x.repeat(1, 512, 1, 1)
        return super().forward(wide.mean(1, keepdim=True), t)


def test_the_largest_batch_accepted_leaves_room_for_the_models_measured_working_memory(monkeypatch):
    from ddpm_engine import InvalidRequestError, plan

    monkeypatch.setattr(plan, "free_bytes", lambda device: 1 << 30)
    engine = Engine.from_module(Wide(), sample_shape=SHAPE, backend="torch", device="cpu", batching=False)
    wide_bytes = 512 * 8 * 8 * 4  # per image
    assert engine.model.io.bytes_per_image >= wide_bytes
    assert engine.max_batch <= (1 << 30) // (2 * wide_bytes)
    assert engine.max_batch < Engine.from_module(Net(), sample_shape=SHAPE, backend="torch", device="cpu",
                                                 batching=False).max_batch
    with pytest.raises(InvalidRequestError, match="too large|at most"):
        engine.sample(engine.max_batch + 1, sampler="ddim", steps=1)
    assert engine.sample([1, 2], sampler="ddim", steps=1).shape == (2, *SHAPE)


def test_the_largest_batch_counts_the_backends_own_working_memory(monkeypatch):
    """A backend whose own buffers take more than torch's tensors (OpenVINO: measured 2.1-2.2x the
    probe's) admits fewer images: its ``working_memory_factor`` multiplies the measured memory."""
    from ddpm_engine import plan
    from ddpm_engine.backends.torch_backend import TorchBackend

    monkeypatch.setattr(plan, "free_bytes", lambda device: 1 << 30)
    sizes = {}
    for factor in (2, 5):
        monkeypatch.setattr(TorchBackend, "working_memory_factor", factor)
        engine = Engine.from_module(Wide(), sample_shape=SHAPE, backend="torch", device="cpu", batching=False)
        assert engine.max_batch == (1 << 30) // plan.bytes_per_image(SHAPE, engine.model.io.bytes_per_image, factor)
        sizes[factor] = engine.max_batch
    assert sizes[5] < sizes[2] * 0.5
