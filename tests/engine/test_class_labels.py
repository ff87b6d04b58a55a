"""Class labels: ``engine.sample(seeds, class_labels=[...])`` for diffusers' ``num_class_embeds``
UNets and any ``forward(x, t, y)``. A label rides with its row (Rows.labels) through the eager
loop, continuous batching, the graph buckets and every backend's export (a third graph input),
so a seed with a label gives the same image alone and in any batch; labels are refused at the
call where they do not fit the model."""

import random

import pytest
import torch
from torch import nn

from ddpm_engine import Engine, InvalidRequestError, checkpoints
from ddpm_engine.cuda.graphs import GraphedSampler
from ddpm_engine.export import iospec

diffusers = pytest.importorskip("diffusers")

SHAPE = (1, 8, 8)
OPTS = dict(sampler="ddim", steps=4)
TOL = 5e-5  # a seed's image in a batch against alone (tests/engine/test_serving.py's close_enough)


def conditional_unet(classes=4):
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1,
                                 norm_num_groups=8, num_class_embeds=classes).eval()


class WithY(nn.Module):
    """guided-diffusion's signature: forward(x, timesteps, y), num_classes an attribute."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.embed = nn.Embedding(3, 1)

    def forward(self, x, t, y):
        return self.conv(x) * torch.cos(t.float() / 300)[:, None, None, None] + self.embed(y)[:, :, None, None]


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, t, y=None):  # an optional input, but no num_classes: not class-conditional
        return self.conv(x)


@pytest.fixture(scope="module")
def unet_model():
    return checkpoints.from_module(conditional_unet(), sample_shape=SHAPE, name="cond")


def seeds(n):
    return [random.getrandbits(64) for _ in range(n)]


def assert_alone_equals_mixed(engine, ss, labels):
    mixed = engine.sample(ss, class_labels=labels, **OPTS)
    for k, (s, label) in enumerate(zip(ss, labels)):
        alone = engine.sample([s], class_labels=[label], **OPTS)[0]
        assert (mixed[k] - alone).abs().max().item() <= TOL, f"seed {s} label {label}"
    return mixed


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_seed_with_a_label_gives_its_image_alone_and_in_a_mixed_batch(unet_model, backend, tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))
    engine = Engine.from_pretrained(unet_model, backend=backend)
    assert engine.model.io.inputs == (iospec.SAMPLE, iospec.TIMESTEP, iospec.CLASS_LABELS)
    ss = seeds(3)
    mixed = assert_alone_equals_mixed(engine, ss, [0, 3, 1])
    relabelled = engine.sample(ss, class_labels=[1, 3, 0], **OPTS)
    assert (relabelled[0] - mixed[0]).abs().max() > 1e-2  # the label is used
    assert (relabelled[1] - mixed[1]).abs().max() <= TOL


def test_the_labels_reach_diffusers_unet_as_its_class_labels(unet_model):
    """One model call through the backend equals diffusers' own call with class_labels."""
    engine = Engine.from_pretrained(unet_model, backend="torch")
    x, t, y = torch.randn(3, *SHAPE), torch.tensor([999, 500, 0]), torch.tensor([2, 0, 3])
    with torch.inference_mode():
        want = unet_model.module.unet(x, t, class_labels=y).sample
        torch.testing.assert_close(engine.backend(x, t, y), want)


def test_a_forward_x_t_y_module_takes_labels_on_torch_and_onnxruntime(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))
    module, ss, images = WithY(), seeds(3), []
    for backend in ("torch", "onnxruntime"):
        engine = Engine.from_module(module, sample_shape=SHAPE, backend=backend)
        assert engine.model.io.num_classes == 3
        images.append(assert_alone_equals_mixed(engine, ss, [2, 0, 1]))
    assert (images[0] - images[1]).abs().max().item() <= 1e-4


def test_labels_ride_with_their_rows_through_continuous_batching(unet_model):
    engine = Engine.from_pretrained(unet_model, backend="torch")
    ss, labels = seeds(6), [0, 1, 2, 3, 2, 1]
    alone = [engine.sample([s], class_labels=[c], **OPTS)[0] for s, c in zip(ss, labels)]
    with engine.serve(max_batch=8, max_wait_ms=20.0) as server:
        futures = [server.submit([s], class_labels=[c], **OPTS) for s, c in zip(ss, labels)]
        got = [f.result(timeout=60)[0] for f in futures]
    assert max((a - b).abs().max().item() for a, b in zip(got, alone)) <= TOL


def test_labels_ride_in_the_graph_buckets_static_rows(unet_model):
    engine = Engine.from_pretrained(unet_model, backend="torch")
    ss, labels = seeds(3), [3, 0, 2]
    graphed = GraphedSampler(engine.plan(**OPTS), max_batch=4, capture=False)
    got = graphed.run(ss, class_labels=labels)
    want = engine.sample(ss, class_labels=labels, driver="eager", **OPTS)
    assert (got - want).abs().max().item() <= TOL


def test_labels_that_do_not_fit_the_model_are_refused_at_the_call(unet_model):
    conditional = Engine.from_pretrained(unet_model, backend="torch")
    plain = Engine.from_module(Plain(), sample_shape=SHAPE, backend="torch")
    with pytest.raises(InvalidRequestError, match="takes no class labels"):
        plain.sample([1], class_labels=[0], **OPTS)
    with pytest.raises(InvalidRequestError, match="class-conditional: pass class_labels"):
        conditional.sample([1], **OPTS)
    with pytest.raises(InvalidRequestError, match=r"class label 4 is not an int in \[0, 4\)"):
        conditional.sample([1, 2], class_labels=[0, 4], **OPTS)
    with pytest.raises(InvalidRequestError, match="2 labels for 3 seeds"):
        conditional.sample([1, 2, 3], class_labels=[0, 1], **OPTS)
    for bad in ([True], [1.0], [-1]):
        with pytest.raises(InvalidRequestError, match="is not an int"):
            conditional.sample([1], class_labels=bad, **OPTS)
    with pytest.raises(InvalidRequestError, match="takes no class labels"):
        plain.submit([1], class_labels=[0], **OPTS)


# ---- classifier-free guidance ----------------------------------------------------------------
class FixedLabel(nn.Module):
    """The reference: guidance by two separate calls of the model, one label for every row."""

    def __init__(self, net, label, null, scale):
        super().__init__()
        self.net, self.label, self.null, self.scale = net, label, null, scale

    def forward(self, x, t):
        cond = self.net(x, t, torch.full_like(t, self.label))
        uncond = self.net(x, t, torch.full_like(t, self.null))
        return uncond + self.scale * (cond - uncond)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_guidance_matches_two_separate_calls_and_a_seed_keeps_its_image_in_a_mixed_batch(backend, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))
    net, scale, ss = WithY(), 3.5, seeds(3)
    engine = Engine.from_module(net, sample_shape=SHAPE, null_label=2, backend=backend)
    mixed = engine.sample(ss, class_labels=[0, 1, 0], guidance_scale=scale, **OPTS)
    for k, label in enumerate([0, 1, 0]):
        reference = Engine.from_module(FixedLabel(net, label, 2, scale), sample_shape=SHAPE, backend="torch")
        want = reference.sample([ss[k]], **OPTS)[0]
        assert (mixed[k] - want).abs().max().item() <= 1e-4, f"row {k} label {label}"
    unguided = engine.sample(ss, class_labels=[0, 1, 0], **OPTS)
    assert (unguided - mixed).abs().max() > 1e-2  # the scale is used


def guided_engine(module=None, **kw):
    return Engine.from_module(module or WithY(), sample_shape=SHAPE, null_label=2, backend="torch", **kw)


def test_guidance_is_fused_into_the_triton_step_with_the_torch_steps_images():
    """The whole guided chain with the fused kernels (combining cond/uncond as they load the
    output) against the torch step (guidance.guided, then the reference step), every kernel."""
    ss, labels = seeds(3), [0, 1, 0]
    module = WithY()
    torch_engine, triton_engine = guided_engine(module, step_impl="torch"), guided_engine(module, step_impl="triton")
    for sampler in ("ddpm", "ddim", "dpmpp_2m", "unipc"):
        opts = dict(sampler=sampler, steps=4, class_labels=labels, guidance_scale=2.5)
        want, got = torch_engine.sample(ss, **opts), triton_engine.sample(ss, **opts)
        assert (got - want).abs().max().item() <= 1e-4, sampler


class Recorder(nn.Module):
    """WithY, recording where each call's inputs live (in a class attribute: the backend calls a copy,
    and may lay x out anew for the network)."""

    num_classes = 3
    calls = []

    def __init__(self):
        super().__init__()
        self.net = WithY()

    def forward(self, x, t, y):
        self.calls.append((x.data_ptr(), t.data_ptr(), y.data_ptr(), y.tolist()))
        return self.net(x, t, y)


def test_the_doubled_inputs_are_static_buffers_refilled_in_place():
    """A guided run allocates its [2B] model inputs once (at its first step) and refills the same
    buffers every step: x twice, t twice, the labels then the null label."""
    from ddpm_engine.plan import reverse_step

    module = Recorder()
    engine = Engine.from_module(module, sample_shape=SHAPE, null_label=2, backend="torch")
    plan = engine.plan(guidance_scale=3.0, **OPTS)
    rows = plan.start(seeds(2), labels=[1, 0])
    buffers = []
    with torch.inference_mode():
        Recorder.calls.clear()
        for _ in range(3):
            reverse_step(plan, rows)
            buffers.append((id(rows.model_inputs), rows.model_inputs.x.data_ptr()))
    assert len(Recorder.calls) == 3 and len(set(buffers)) == 1  # one set of buffers, refilled
    assert len({call[1:3] for call in Recorder.calls}) == 1  # the model sees the same t and labels buffers
    assert all(call[3] == [1, 0, 2, 2] for call in Recorder.calls)
    inputs = rows.model_inputs
    torch.testing.assert_close(inputs.x[:2], inputs.x[2:])
    assert torch.equal(inputs.t[:2], inputs.t[2:])


def test_guidance_in_the_graph_buckets_and_continuous_batching_gives_each_seed_its_image():
    """Guided rows in a graph bucket (capture=False: the CPU's emulation of the drivers) and in the
    continuous server (rows joining a running batch) end as the eager loop's."""
    engine = guided_engine()
    ss, labels, opts = seeds(3), [0, 1, 0], dict(guidance_scale=3.0, **OPTS)
    want = engine.sample(ss, class_labels=labels, driver="eager", **opts)
    graphed = GraphedSampler(engine.plan(**opts), max_batch=4, capture=False)
    assert (graphed.run(ss, class_labels=labels) - want).abs().max().item() <= TOL
    with engine.serve(max_batch=8, max_wait_ms=20.0) as server:
        futures = [server.submit([s], class_labels=[c], **opts) for s, c in zip(ss, labels)]
        got = torch.cat([f.result(timeout=60) for f in futures])
    assert (got - want).abs().max().item() <= TOL


def test_guidance_guides_the_prediction_and_keeps_the_conditional_variance():
    from ddpm_engine.plan import guided

    cond, uncond = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)  # 2C = 4 channels: [prediction, variance]
    out = guided(torch.cat([cond, uncond]), 2.0, channels=2)
    torch.testing.assert_close(out[:, :2], uncond[:, :2] + 2.0 * (cond[:, :2] - uncond[:, :2]))
    torch.testing.assert_close(out[:, 2:], cond[:, 2:])
    torch.testing.assert_close(guided(torch.cat([cond, uncond]), 1.0, channels=4), cond)


def test_guidance_is_refused_at_the_call_where_it_cannot_run(unet_model):
    plain = Engine.from_module(Plain(), sample_shape=SHAPE, backend="torch")
    no_null = Engine.from_pretrained(unet_model, backend="torch")
    with pytest.raises(InvalidRequestError, match="needs a class-conditional model"):
        plain.sample([1], guidance_scale=2.0, **OPTS)
    with pytest.raises(InvalidRequestError, match="needs the model's null label"):
        no_null.sample([1], class_labels=[0], guidance_scale=2.0, **OPTS)
    conditional = Engine.from_module(WithY(), sample_shape=SHAPE, null_label=2, backend="torch")
    for bad in (-1.0, float("nan"), "2", True):
        with pytest.raises(InvalidRequestError, match="guidance_scale must be"):
            conditional.sample([1], class_labels=[0], guidance_scale=bad, **OPTS)
    with pytest.raises(Exception, match=r"null_label=5 is not a label"):
        Engine.from_module(WithY(), sample_shape=SHAPE, null_label=5, backend="torch")


@pytest.mark.slow
def test_aoti_takes_labels_as_its_third_input(unet_model, tmp_path, monkeypatch):
    """AOTInductor (a C++ compile: slow) exports the labels as a named third input."""
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))
    ss, labels = seeds(3), [0, 3, 1]
    want = Engine.from_pretrained(unet_model, backend="torch").sample(ss, class_labels=labels, **OPTS)
    engine = Engine.from_pretrained(unet_model, backend="aoti")
    assert engine.backend.extra_inputs == (iospec.CLASS_LABELS,)
    got = assert_alone_equals_mixed(engine, ss, labels)
    assert (got - want).abs().max().item() <= 1e-4
