"""Every backend and precision against eager fp32 on a CUDA GPU (skipped without one).

For the CIFAR-10 UNet (random weights) and the bundled digits model:
- the model output of each backend/precision vs eager fp32 (TF32 off): relative error (max abs
  diff / max abs of the reference) <= 1e-4 in fp32, <= 3e-2 in fp16/bf16;
- a whole DDPM-1000 run with the same seeds: finite, and close to the eager fp32 images (max abs
  diff and PSNR, thresholds below; measured values are recorded as junit properties);
- CUDA-graph replay through the C driver and the one-launch WHILE-node loop gives the same images
  as the Python replay loop, and as Engine.sample;
- the onnxruntime backend refuses the graph drivers (its CUDA provider is pinned to one stream).
UNVERIFIED: written on a machine without a GPU; the image thresholds are first guesses to be
confirmed on the first GPU run (bench/gpu_check.py records the measured values).
"""

import pytest
import torch

from ddpm_engine.cuda.graphs import CANARY_TOL

from ddpm_engine import backends

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODELS = ("cifar10", "digits")
BACKENDS = ("torch", "aoti", "onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")
EPS_REL_TOL = {"fp32": 1e-4, "fp16": 3e-2, "bf16": 3e-2}
IMAGE_MIN_PSNR_DB = {"fp32": 40.0, "fp16": 20.0, "bf16": 15.0}
CASES = [(m, b, p) for m in MODELS for b in BACKENDS for p in PRECISIONS if b != "onnxruntime" or p == "fp32"]


@pytest.fixture(scope="module")
def reference(models, suite, seeds):
    """model name -> (eager fp32 backend, its DDPM-1000 images for ``seeds``)."""
    cache = {}

    def get(name):
        if name not in cache:
            eng = suite.make_engine(models(name), "torch", "fp32")
            cache[name] = (eng.backend, eng.sample(seeds, sampler="ddpm", driver="eager"))
        return cache[name]

    yield get
    cache.clear()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def engines(models, suite):
    cache = {}

    def get(model, backend, precision):
        reason = backends.available("cuda").get(backend)
        if reason is not None:
            pytest.skip(f"backend {backend} unavailable: {reason}")
        key = (model, backend, precision)
        if key not in cache:
            cache[key] = suite.make_engine(models(model), backend, precision)
        return cache[key]

    yield get
    cache.clear()
    torch.cuda.empty_cache()


@pytest.mark.parametrize("model,backend,precision", CASES)
def test_model_output_matches_eager_fp32(model, backend, precision, engines, reference, models, suite,
                                         record_property):
    eng = engines(model, backend, precision)
    ref_backend, _ = reference(model)
    err = suite.eps_rel_err(eng.backend, ref_backend, models(model).sample_shape, "cuda")
    record_property("eps_rel_err", err)
    assert err <= EPS_REL_TOL[precision]  # inputs from a fixed generator (suite.eps_rel_err, seed 0)


@pytest.mark.parametrize("model,backend,precision", CASES)
def test_ddpm_1000_run_matches_eager_fp32(model, backend, precision, engines, reference, seeds, suite,
                                          record_property):
    eng = engines(model, backend, precision)
    _, ref_images = reference(model)
    images = eng.sample(seeds, sampler="ddpm")
    assert images.shape == ref_images.shape
    d = suite.image_diff(images, ref_images)
    record_property("image_max_abs", d["image_max_abs"])
    record_property("psnr_db", d["psnr_db"])
    assert d["finite"], f"NaN or Inf in the images (seeds {seeds})"
    assert d["psnr_db"] >= IMAGE_MIN_PSNR_DB[precision], (d, seeds)
    if precision == "fp32":
        assert d["image_max_abs"] <= 5e-2, (d, seeds)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("precision", ("fp32", "fp16"))
def test_graph_drivers_match_python_loop(model, precision, engines, seeds):
    eng = engines(model, "torch", precision)
    gs = eng.graphed("ddpm", eng.num_train_timesteps, max_batch=len(seeds))
    py = gs.run(seeds, driver="python")
    c = gs.run(seeds, driver="c")
    assert torch.isfinite(c).all()
    assert torch.equal(c, py), seeds  # the same graph replayed the same number of times
    loop = gs.run(seeds, driver="graph_loop")  # the step graph inside a WHILE node, one launch
    assert torch.equal(loop, py), seeds
    ref = eng.sample(seeds, sampler="ddpm", driver="eager")
    assert (c - ref).abs().max().item() <= CANARY_TOL[precision], seeds  # the engine's canary holds one step to it


def test_onnxruntime_refuses_graph_drivers(models):
    from ddpm_engine import Engine
    from ddpm_engine.errors import BackendUnavailableError

    reason = backends.available("cuda").get("onnxruntime")
    if reason is not None:
        pytest.skip(f"backend onnxruntime unavailable: {reason}")
    eng = Engine(models("digits"), backend="onnxruntime", device="cuda")
    with pytest.raises(BackendUnavailableError, match="stream"):
        eng.sample([1, 2], sampler="ddim", steps=5, driver="c")
