"""Reused deep features, ``cache_interval=N`` (engine/deepcache.py): each architecture's split
computes the eager module's output exactly on its full step and the same output on a shallow
step with fresh features; N = 1 is today's engine; the host's cadence makes every N-th step full
and a batch that fresh rows join runs a full step next; every sampler takes it; what cannot run
it is refused at the call."""

import pytest
import torch
from torch import nn

from ddpm_engine import Engine, InvalidRequestError, deepcache
from ddpm_engine.cuda.graphs import GraphedSampler
from ddpm_engine.models import DoubleConvUNet
from ddpm_engine.models.openai_unet import OpenAIUNet
from ddpm_engine.samplers import SAMPLERS
from ddpm_engine.slots import SlotBatch

SHAPE = (1, 8, 8)


def digits_like():
    return DoubleConvUNet(1, (8, 16, 32), time_emb_dim=16).eval()


def diffusers_unet(classes=None):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                 norm_num_groups=8, num_class_embeds=classes).eval()


def openai_unet(classes=None, updown=False):
    return OpenAIUNet(in_channels=1, model_channels=32, out_channels=1, num_res_blocks=1, attention_resolutions=(2,),
                      channel_mult=(1, 2), num_classes=classes, resblock_updown=updown).eval()


MODELS = {  # name -> (module factory, number of classes or None)
    "double_conv": (digits_like, None),
    "diffusers": (diffusers_unet, None),
    "diffusers_labels": (lambda: diffusers_unet(5), 5),
    "openai": (openai_unet, None),
    "openai_labels_updown": (lambda: openai_unet(3, updown=True), 3),
}


def inputs(classes, batch=3):
    x = torch.randn(batch, *SHAPE)
    t = torch.randint(0, 1000, (batch,))
    return x, t, *([torch.randint(0, classes, (batch,))] if classes else [])


def wrapped(module):
    """The module as a backend runs it (a diffusers UNet inside the engine's adapter)."""
    return Engine.from_module(module, sample_shape=SHAPE, backend="torch", device="cpu").model.module


@pytest.mark.parametrize("name", MODELS)
def test_the_full_step_is_the_eager_module_exactly_and_a_fresh_shallow_step_matches_it(name):
    make, classes = MODELS[name]
    module = wrapped(make())
    pair = deepcache.split(module)
    args = inputs(classes)
    with torch.inference_mode():
        want = module(*args)
        out, deep = pair.full(*args)
        shallow = pair.shallow(args[0], args[1], deep, *args[2:])
    assert torch.equal(out, want)
    assert deep.shape[0] == 3 and deep.shape[1] > SHAPE[0]
    assert (shallow - out).abs().max().item() <= 1e-5 * max(1.0, out.abs().max().item())
    with torch.inference_mode():  # another x: the shallow branch reads x, not only the cache
        other = pair.shallow(args[0] + 1.0, args[1], deep, *args[2:])
    assert (other - out).abs().max().item() > 1e-3


def test_cache_interval_1_is_todays_engine():
    torch.manual_seed(0)
    engine = Engine.from_module(digits_like(), sample_shape=SHAPE, backend="torch", device="cpu", batching=False)
    assert engine.plan("ddim", 6, cache_interval=1) is engine.plan("ddim", 6)
    assert torch.equal(engine.sample([5, 6], sampler="ddim", steps=6, cache_interval=1),
                       engine.sample([5, 6], sampler="ddim", steps=6))
    assert engine.plan("ddim", 6).start([1]).deep is None


class Spy:
    """Wraps a backend; records "full", "shallow" (and "plain") calls with their batch sizes."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x, t, *extra):
        self.calls.append(("plain", x.shape[0]))
        return self.inner(x, t, *extra)

    def full(self, x, t, *extra):
        self.calls.append(("full", x.shape[0]))
        return self.inner.full(x, t, *extra)

    def shallow(self, x, t, deep, *extra):
        self.calls.append(("shallow", x.shape[0]))
        return self.inner.shallow(x, t, deep, *extra)


@pytest.fixture
def spied():
    engine = Engine.from_module(digits_like(), sample_shape=SHAPE, backend="torch", device="cpu", batching=False,
                                step_impl="torch")
    engine.backend = Spy(engine.backend)  # before the first plan: plans hold the engine's backend
    return engine


def test_the_cadence_is_full_then_n_minus_1_shallow_and_restarts():
    cadence = deepcache.Cadence(3)
    assert [cadence.next() for _ in range(7)] == [True, False, False, True, False, False, True]
    cadence.next()
    cadence.restart()
    assert cadence.next() is True
    assert all(deepcache.Cadence(1).next() for _ in range(4))


@pytest.fixture(scope="module")
def digits():
    engine = Engine.from_pretrained("digits", backend="torch", device="cpu", batching=False, step_impl="torch")
    engine.backend = Spy(engine.backend)
    return engine


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_every_nth_step_full_and_stays_close(digits, sampler):
    steps, n = 7, 3
    plain = digits.sample([11, 12], sampler=sampler, steps=steps, driver="eager")
    digits.backend.calls.clear()
    cached = digits.sample([11, 12], sampler=sampler, steps=steps, driver="eager", cache_interval=n)
    assert [kind for kind, _ in digits.backend.calls] == ["full" if k % n == 0 else "shallow" for k in range(steps)]
    assert torch.isfinite(cached).all()
    assert not torch.equal(cached, plain)  # the shallow steps are not the full model
    assert (cached - plain).abs().mean().item() < 0.25  # but the same images, roughly (the trained model)


class Req:
    """A request as a SlotBatch sees it."""

    def __init__(self, seeds):
        self.seeds = seeds


def test_a_row_joining_a_running_batch_starts_with_a_full_step(spied):
    plan = spied.plan("ddim", 6, cache_interval=3)
    batch = SlotBatch(plan)

    a, b = Req([1, 2]), Req([3])
    batch.add([a])
    for _ in range(2):
        batch.step()  # full, shallow: the next would be shallow too
    spied.backend.calls.clear()
    batch.add([b])
    batch.step()
    assert spied.backend.calls == [("full", 3)]
    for _ in range(3):
        batch.step()  # b's steps 2..4 (shallow, shallow, full): as alone
    b_images = batch.images(b)
    spied.backend.calls.clear()
    alone = SlotBatch(plan)
    alone.add([Req([3])])
    for _ in range(4):
        alone.step()
    assert (batch.images(b) - alone.images(next(iter(alone.where)))).abs().max().item() <= 5e-5
    assert torch.equal(b_images, batch.images(b))


def test_cached_features_move_with_their_rows_when_the_batch_is_repacked(spied):
    plan = spied.plan("dpmpp_2m", 5, cache_interval=5)
    batch = SlotBatch(plan)

    a, b = Req([21]), Req([22, 23])
    batch.add([a, b])
    batch.step()  # full: each row's features cached
    kept = batch.rows.deep[1:].clone()
    batch.remove([a])  # b moves to slots 0..1 with its cache
    assert torch.equal(batch.rows.deep, kept)


def test_the_continuous_batching_server_takes_cache_interval(spied):
    from ddpm_engine.serving import Server

    want = spied.sample([7, 8], sampler="ddim", steps=5, driver="eager", cache_interval=2)
    with Server(spied, max_batch=4, max_wait_ms=0.0) as server:
        got = server.submit([7, 8], sampler="ddim", steps=5, cache_interval=2).result(timeout=120)
    assert (got - want).abs().max().item() <= 5e-5


def test_graph_buckets_leave_cache_interval_to_the_eager_loop(spied):
    plan = spied.plan("ddim", 4, cache_interval=2)
    assert not plan.graphable
    gs = GraphedSampler(plan, max_batch=2, capture=False)
    assert "cache_interval=2" in gs.refused
    want = spied.sample([1], sampler="ddim", steps=4, driver="eager", cache_interval=2)
    assert torch.equal(gs.run([1]), want)


def test_guidance_keeps_both_halves_features_per_row():
    net = diffusers_unet(4)
    engine = Engine.from_module(net, sample_shape=SHAPE, backend="torch", device="cpu", null_label=3,
                                batching=False)
    plan = engine.plan("ddim", 4, guidance_scale=2.0, cache_interval=2)
    rows = plan.start([1, 2], labels=[0, 1])
    c, h, w = plan.deep_shape
    assert tuple(rows.deep.shape) == (2, 2 * c, h, w)
    deep = torch.randn(4, c, h, w)
    assert torch.equal(deepcache.unfold(deepcache.fold(deep, 2), 4), deep)
    assert torch.equal(deepcache.fold(deep, 2, out=torch.empty(2, 2 * c, h, w)), deepcache.fold(deep, 2))  # in place
    from ddpm_engine.plan import model_output

    with torch.inference_mode():
        full = model_output(plan, rows, full=True)
        shallow = model_output(plan, rows, full=False)
        plain = model_output(engine.plan("ddim", 4, guidance_scale=2.0), rows)
    assert torch.equal(full, plain)
    assert (shallow - full).abs().max().item() <= 1e-5 * max(1.0, full.abs().max().item())


class Plain(nn.Module):
    def forward(self, x, t):
        return x * t[:, None, None, None].float() / 1000


def test_what_cannot_run_it_is_refused_at_the_call():
    engine = Engine.from_module(digits_like(), sample_shape=SHAPE, backend="torch", device="cpu")
    for bad in (0, -2, 1.5, "2", True):
        with pytest.raises(InvalidRequestError, match="cache_interval must be an int >= 1"):
            engine.sample([1], sampler="ddim", steps=3, cache_interval=bad)
    unsplittable = Engine.from_module(Plain(), sample_shape=SHAPE, backend="torch", device="cpu")
    with pytest.raises(InvalidRequestError, match="needs a UNet the engine can split.*this model is a Plain"):
        unsplittable.sample([1], sampler="ddim", steps=3, cache_interval=2)
    single = Engine.from_module(DoubleConvUNet(1, (8,)).eval(), sample_shape=SHAPE, backend="torch", device="cpu")
    with pytest.raises(InvalidRequestError, match="single level"):
        single.plan("ddim", 3, cache_interval=2)
    assert unsplittable.sample([1], sampler="ddim", steps=3).shape == (1, *SHAPE)  # N = 1 still runs


def test_a_backend_without_the_two_graphs_is_refused_naming_those_that_have_them(spied):
    from ddpm_engine.backends.base import Backend

    class NoCache(Backend):
        name = "nocache"

        def run(self, x, t, *extra):
            return x

    spied.backend = NoCache("cpu", "fp32", SHAPE)
    with pytest.raises(InvalidRequestError, match="nocache backend does not run cache_interval.*'torch'"):
        spied.plan("ddim", 3, cache_interval=2)


def test_the_shallow_step_checks_the_features_it_is_given(spied):
    x, t = torch.randn(2, *SHAPE), torch.tensor([5, 6])
    with pytest.raises(InvalidRequestError, match="deep features"):
        spied.backend.inner.shallow(x, t, torch.zeros(2, 1, 2, 2))


def test_the_plan_names_the_interval(spied):
    assert spied.plan("ddim", 4, cache_interval=3).name == "ddim-4 eta=0 cache=3"
    assert spied.plan("ddim", 4, cache_interval=3).key != spied.plan("ddim", 4).key


def test_the_cli_takes_cache_interval_and_repeats_it(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from ddpm_engine.__main__ import main
    from ddpm_engine.images import read_png_text, save_grid

    out, want_png = tmp_path / "cached.png", tmp_path / "want.png"
    opts = ["--model", "digits", "--backend", "torch", "--sampler", "ddim", "--steps", "4", "--quiet"]
    assert main(["sample", *opts, "--cache-interval", "2", "--seeds", "5", "6", "--out", str(out)]) == 0
    assert "--cache-interval 2 --seeds 5 6" in read_png_text(out)["command"]
    engine = Engine.from_pretrained("digits", backend="torch")
    save_grid(engine.sample([5, 6], sampler="ddim", steps=4, cache_interval=2), want_png, scale=4)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(want_png)))
    assert main(["sample", *opts, "--cache-interval", "0", "--out", str(tmp_path / "x.png")]) != 0
    assert "cache_interval must be an int >= 1" in capsys.readouterr().err


# ---- the exported backends: two more graphs, cached, checked against the eager split ----------
@pytest.mark.parametrize("backend,tol", [("onnxruntime", 1e-4), ("openvino", 1e-4)])
def test_exported_backends_run_the_two_graphs_like_the_eager_split(backend, tol, tmp_path, monkeypatch):
    pytest.importorskip(backend)
    pytest.importorskip("onnx")
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))
    torch.manual_seed(0)
    module = diffusers_unet(4) if backend == "onnxruntime" else digits_like()
    classes = 4 if backend == "onnxruntime" else None
    labels = dict(class_labels=[1, 3]) if classes else {}
    eager = Engine.from_module(module, sample_shape=SHAPE, backend="torch", batching=False)
    exported = Engine.from_module(module, sample_shape=SHAPE, backend=backend, batching=False)
    opts = dict(sampler="ddim", steps=5, cache_interval=2, **labels)
    want = eager.sample([3, 4], driver="eager", **opts)
    got = exported.sample([3, 4], driver="eager", **opts)
    assert (got - want).abs().max().item() <= tol
    onnx_files = sorted(p.name for p in (tmp_path / "onnx").iterdir())
    assert len(onnx_files) == 3, onnx_files  # the whole graph, the full step's and the shallow step's
    x, t, *extra = inputs(classes, batch=2)
    out, deep = exported.backend.full(x, t, *extra)
    assert torch.allclose(out, exported.backend(x, t, *extra), atol=1e-5)
    assert tuple(deep.shape) == (2, *eager.backend.deep_shape(SHAPE))


def test_a_graph_opened_from_a_file_is_refused_cache_interval(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from ddpm_engine.backends.onnxruntime_backend import OnnxRuntimeBackend
    from ddpm_engine.export.onnx_export import export_onnx

    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))
    engine = Engine.from_module(digits_like(), sample_shape=SHAPE, backend="torch", batching=False)
    engine.backend = OnnxRuntimeBackend.from_file(export_onnx(engine.model, tmp_path / "m.onnx"))
    with pytest.raises(InvalidRequestError, match="from_file has no full/shallow graphs"):
        engine.sample([1], sampler="ddim", steps=3, cache_interval=2)


def test_the_http_request_takes_cache_interval_through_the_engines_checks():
    ray_serve = pytest.importorskip("ddpm_engine.ray_serve", exc_type=ImportError)
    import json

    engine = Engine.from_pretrained("digits", backend="torch", batching=False)
    body = json.dumps({"seeds": [7, 8], "sampler": "ddim", "steps": 5, "cache_interval": 3}).encode()
    request = ray_serve.check_request(engine, **ray_serve.parse_body(body), max_images=4)
    assert request.options.cache_interval == 3
    for bad, message in [(0, "cache_interval must be an int >= 1"), ("3", "cache_interval must be an integer"),
                         (2.0, "cache_interval must be an integer")]:
        body = json.dumps({"seeds": [7], "cache_interval": bad}).encode()
        with pytest.raises(InvalidRequestError, match=message):
            ray_serve.check_request(engine, **ray_serve.parse_body(body), max_images=4)
