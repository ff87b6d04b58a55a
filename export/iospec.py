"""The one I/O contract of an exported UNet graph, shared by the exporter and the runtimes.

Inputs: ``sample`` float32 [batch, C, H, W] and ``timestep`` int64 [batch] (training timesteps);
output: ``model_output`` float32 [batch, C, H, W]. Only the batch axis is dynamic. The model's
identity travels in the file's metadata_props so a runtime can refuse a graph of another model.
"""

from __future__ import annotations

import json

SAMPLE = "sample"
TIMESTEP = "timestep"
OUTPUT = "model_output"
BATCH_AXIS = "batch"
DEFAULT_OPSET = 18
MIN_OPSET = 17

# metadata_props keys
META_WEIGHTS_HASH = "ddpm_engine.weights_hash"
META_SAMPLE_SHAPE = "ddpm_engine.sample_shape"
META_EXPORTER = "ddpm_engine.exporter"

# (name, dtype, shape) with None for the dynamic batch axis
Tensor = tuple  # (str, str, tuple)


def expected(sample_shape) -> tuple[list[Tensor], list[Tensor]]:
    """(inputs, outputs) the graph of a model with samples of ``sample_shape`` (C, H, W) must have."""
    shape = (None, *(int(s) for s in sample_shape))
    return [(SAMPLE, "float32", shape), (TIMESTEP, "int64", (None,))], [(OUTPUT, "float32", shape)]


def metadata(weights_hash: str, sample_shape, exporter: str) -> dict:
    return {META_WEIGHTS_HASH: weights_hash, META_SAMPLE_SHAPE: json.dumps([int(s) for s in sample_shape]),
            META_EXPORTER: exporter}


def sample_shape_from_metadata(meta: dict):
    """The (C, H, W) recorded at export, or None if the file has none."""
    try:
        return tuple(int(s) for s in json.loads(meta[META_SAMPLE_SHAPE]))
    except (KeyError, TypeError, ValueError):
        return None


def mismatches(inputs: list[Tensor], outputs: list[Tensor], sample_shape=None) -> list[str]:
    """What in a graph's (inputs, outputs) breaks the contract; [] when it conforms.

    A dynamic axis is given as None (or any non-int, e.g. a dim_param string). Without
    ``sample_shape`` the C, H, W of the sample are taken from the graph itself.
    """
    if sample_shape is None:
        sample = dict((n, s) for n, _, s in inputs).get(SAMPLE, ())
        fixed = len(sample) == 4 and all(isinstance(s, int) for s in sample[1:])
        sample_shape = tuple(sample[1:]) if fixed else (-1, -1, -1)  # -1: reported as a mismatch below
    want_in, want_out = expected(sample_shape)
    problems = []
    for kind, want, got in (("input", want_in, inputs), ("output", want_out, outputs)):
        if [n for n, _, _ in got] != [n for n, _, _ in want]:
            problems.append(f"{kind}s are {[n for n, _, _ in got]}, expected {[n for n, _, _ in want]}")
            continue
        for (name, dtype, shape), (_, got_dtype, got_shape) in zip(want, got):
            if got_dtype != dtype:
                problems.append(f"{kind} {name!r} is {got_dtype}, expected {dtype}")
            got_shape = tuple(s if isinstance(s, int) else None for s in got_shape)
            if got_shape != shape:
                problems.append(f"{kind} {name!r} has shape {_show(got_shape)}, expected {_show(shape)}")
    return problems


def _show(shape) -> str:
    return "[" + ", ".join(BATCH_AXIS if s is None else str(s) for s in shape) + "]"


_ONNX_DTYPES = {1: "float32", 7: "int64", 10: "float16", 16: "bfloat16", 11: "float64", 6: "int32"}
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16",
               "tensor(bfloat16)": "bfloat16", "tensor(double)": "float64", "tensor(int32)": "int32"}


def from_onnx(model) -> tuple[list[Tensor], list[Tensor]]:
    """(inputs, outputs) of an ``onnx.ModelProto``."""

    def one(v):
        tt = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
        return (v.name, _ONNX_DTYPES.get(tt.elem_type, f"onnx type {tt.elem_type}"), dims)

    return [one(v) for v in model.graph.input], [one(v) for v in model.graph.output]


def from_session(session) -> tuple[list[Tensor], list[Tensor]]:
    """(inputs, outputs) of an ``onnxruntime.InferenceSession``."""

    def one(v):
        return (v.name, _ORT_DTYPES.get(v.type, v.type), tuple(s if isinstance(s, int) else None for s in v.shape))

    return [one(v) for v in session.get_inputs()], [one(v) for v in session.get_outputs()]


_OV_DTYPES = {"f32": "float32", "i64": "int64", "f16": "float16", "bf16": "bfloat16", "f64": "float64", "i32": "int32"}


def from_openvino(model) -> tuple[list[Tensor], list[Tensor]]:
    """(inputs, outputs) of an ``openvino.Model``."""

    def one(port):
        shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
        name = port.get_element_type().get_type_name()
        return (port.get_any_name(), _OV_DTYPES.get(name, name), shape)

    return [one(p) for p in model.inputs], [one(p) for p in model.outputs]
