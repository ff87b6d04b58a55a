"""Build a TensorRT engine from the exported ONNX graph, cached on disk.

UNVERIFIED: written against TensorRT 10's documented Python API (``trt.Builder``,
``trt.OnnxParser``, ``IOptimizationProfile.set_shape``, ``IBuilderConfig.set_flag`` /
``clear_flag``, ``create_timing_cache``, ``build_serialized_network``), but never run: the package
``tensorrt`` does not install on this project's CI machine, which has no GPU either.

What is built: the fp32 ONNX graph of ``export.onnx_export`` (dynamic batch), with one explicit
optimization profile for the batch axis (``Profile(min, opt, max)``; TensorRT tunes its kernels
for ``opt`` and accepts any batch in [min, max]). Precision: "fp32" clears the TF32 flag (so the
parity suite compares true fp32), "fp16" / "bf16" set the matching builder flag and let TensorRT
pick the faster kernel per layer (the graph stays weakly typed: its inputs and outputs are
float32 and int64, the precision is internal).

Cache (``ddpm_engine.cache``): ``$DDPM_ENGINE_CACHE/tensorrt`` (default ``~/.cache/ddpm-engine/tensorrt``): one
serialized engine per (ONNX file content - which holds the weights hash -, weights hash,
TensorRT version, GPU name and compute capability, precision, profile), plus one timing cache
per (TensorRT version, GPU) shared by all builds, so a rebuild at another precision or profile
reuses the measured tactics. Files are written under a temporary name and renamed; a plan that
TensorRT cannot deserialize is rebuilt once (backends.tensorrt_backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ddpm_engine import cache
from ddpm_engine.errors import BackendUnavailableError, ExportError, InvalidRequestError, require

from . import iospec

WORKSPACE_BYTES = 4 << 30


@dataclass(frozen=True)
class Profile:
    """The batch sizes one engine accepts (min..max) and is tuned for (opt)."""

    min: int = 1
    opt: int = 32
    max: int = 256

    def __post_init__(self):
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.min, self.opt, self.max))
        if not ok or not 1 <= self.min <= self.opt <= self.max:
            raise InvalidRequestError(f"a TensorRT profile needs ints 1 <= min <= opt <= max, got {self}")


DEFAULT_PROFILE = Profile()


def tensorrt():
    return require("tensorrt", "the tensorrt backend (a TensorRT 10 build for your CUDA version)")


def gpu_name(device) -> str:
    """'NVIDIA H100 80GB HBM3 sm90': the name and compute capability key the engine cache."""
    device = torch.device(device)
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} sm{props.major}{props.minor}"


def plan_builder(loaded, device, precision: str = "fp32", profile: Profile = DEFAULT_PROFILE, cache_dir=None):
    """(the cached plan's path, ``make(out)`` that builds the engine into ``out``): for
    ``cache.build`` / ``cache.load``; the ONNX export (cached too) happens here, the build in make."""
    trt = tensorrt()
    require("onnx", "the tensorrt backend (ONNX export)")
    from .onnx_export import export_onnx

    onnx_path = export_onnx(loaded)
    onnx_bytes = onnx_path.read_bytes()
    gpu = gpu_name(device)
    parts = {"onnx": onnx_bytes, "weights": loaded.weights_hash, "tensorrt": trt.__version__, "gpu": gpu,
             "precision": precision, "profile": [profile.min, profile.opt, profile.max]}
    plan = cache.artifact_path("tensorrt", loaded.name, parts, ".plan", (precision,), cache_dir)
    timing = plan.parent / f"timing-{cache.slug(trt.__version__)}-{cache.slug(gpu)}.cache"

    def make(out: Path) -> None:
        engine_bytes, timing_bytes = _build(trt, onnx_bytes, onnx_path, loaded.sample_shape, precision, profile,
                                            timing.read_bytes() if timing.is_file() else b"",
                                            loaded.io.extra_inputs)
        out.write_bytes(engine_bytes)
        if timing_bytes:
            cache.write_bytes(timing, timing_bytes)

    return plan, make


def _build(trt, onnx_bytes: bytes, onnx_path: Path, sample_shape, precision: str, profile: Profile,
           timing_cache: bytes, extra=()) -> tuple[bytes, bytes]:
    """(serialized engine, serialized timing cache). UNVERIFIED (see the module docstring)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes, str(onnx_path)):  # the path: where a large graph's external data lies
        errors = "; ".join(str(parser.get_error(k)) for k in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {errors or 'no message'}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # true fp32: the parity suite's reference
    elif precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        if not hasattr(trt.BuilderFlag, "BF16"):
            raise BackendUnavailableError(f"TensorRT {trt.__version__} has no bf16 builder flag; use fp16 or "
                                          "TensorRT >= 9")
        config.set_flag(trt.BuilderFlag.BF16)

    shape = tuple(int(s) for s in sample_shape)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(iospec.SAMPLE, (profile.min, *shape), (profile.opt, *shape), (profile.max, *shape))
    for name in iospec.inputs_of(extra)[1:]:  # timestep and the model's extra inputs
        rest = () if iospec.is_integer(name) else shape  # [batch], or [batch, C, H, W]
        opt_profile.set_shape(name, (profile.min, *rest), (profile.opt, *rest), (profile.max, *rest))
    config.add_optimization_profile(opt_profile)

    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache of another GPU is not used
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name} at {precision} "
                          f"(profile {profile}); see the TensorRT log above")
    timing_bytes = bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(serialized)), timing_bytes
