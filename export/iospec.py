"""The one I/O contract of an exported UNet graph, shared by the exporter and the runtimes.

Inputs: ``sample`` float32 [batch, C, H, W] and ``timestep`` int64 [batch] (training timesteps),
then the extra inputs the model takes, in this order: ``class_labels`` int64 [batch] (a
class-conditional model), ``x_self_cond`` float32 [batch, C, H, W] (a self-conditioned model:
lucidrains' ``self_condition``, fed its previous x0 estimate). Output: ``model_output`` float32 [batch, C', H, W], C' = C, or 2C for
a model that learned its variance. Only the batch axis must be dynamic; a graph whose other axes
are symbolic too (an exporter that kept H and W free) is accepted, those axes being checked by
value when the graph runs the load probe (``engine.probe.check_graph``), and reported by their
own names. The model's identity travels in the file's metadata_props so a runtime can refuse a
graph of another model.

Reused deep features (``cache_interval``, engine/deepcache.py) export two more graphs of a model:
the *full* step, whose outputs are ``model_output`` then ``deep_features`` float32 [batch, C_d,
H_d, W_d], and the *shallow* step, whose inputs are the model's then ``deep_features`` (last).
Without ``deep_features`` each follows the contract above (``without_deep``).

``EXTRA_INPUTS`` is the one home of the extra inputs' names and order: the backends' call
(``backend(x, t, *extra)``), their input checks, the exporters and ``plan.reverse_step``
follow it.
"""

from __future__ import annotations

import json

SAMPLE = "sample"
TIMESTEP = "timestep"
OUTPUT = "model_output"
CLASS_LABELS = "class_labels"  # int64 [batch]: a class-conditional model's labels
SELF_COND = "x_self_cond"  # float32 [batch, C, H, W]: a self-conditioned model's previous x0 estimate
EXTRA_INPUTS = (CLASS_LABELS, SELF_COND)  # their order after sample and timestep
DEEP = "deep_features"  # float32 [batch, C_d, H_d, W_d]: the full step's second output, the shallow step's last input


def is_integer(name: str) -> bool:
    """Whether graph input ``name`` is int64 (timestep, class_labels) rather than float32."""
    return name in (TIMESTEP, CLASS_LABELS)
BATCH_AXIS = "batch"
DEFAULT_OPSET = 18
MIN_OPSET = 17

# metadata_props keys
META_WEIGHTS_HASH = "ddpm_engine.weights_hash"
META_SAMPLE_SHAPE = "ddpm_engine.sample_shape"
META_EXPORTER = "ddpm_engine.exporter"

# (name, dtype, shape) with None for the dynamic batch axis
Tensor = tuple  # (str, str, tuple)


def inputs_of(extra=()) -> tuple:
    """The input names of a graph with the ``extra`` inputs (names of EXTRA_INPUTS), in order."""
    unknown = [n for n in extra if n not in EXTRA_INPUTS]
    if unknown:
        raise ValueError(f"unknown graph inputs {unknown}; known: {list(EXTRA_INPUTS)}")
    return (SAMPLE, TIMESTEP, *(n for n in EXTRA_INPUTS if n in extra))


def expected(sample_shape, out_channels: int | None = None, extra=()) -> tuple[list[Tensor], list[Tensor]]:
    """(inputs, outputs) the graph of a model with samples of ``sample_shape`` (C, H, W) must
    have; ``out_channels``: C' of the output (default C); ``extra``: its extra inputs."""
    shape = (None, *(int(s) for s in sample_shape))
    out = shape if out_channels is None else (None, int(out_channels), *shape[2:])
    ins = [(SAMPLE, "float32", shape), (TIMESTEP, "int64", (None,))]
    ins += [(n, "int64", (None,)) if is_integer(n) else (n, "float32", shape) for n in inputs_of(extra)[2:]]
    return ins, [(OUTPUT, "float32", out)]


def metadata(weights_hash: str, sample_shape, exporter: str) -> dict:
    return {META_WEIGHTS_HASH: weights_hash, META_SAMPLE_SHAPE: json.dumps([int(s) for s in sample_shape]),
            META_EXPORTER: exporter}


def sample_shape_from_metadata(meta: dict):
    """The (C, H, W) recorded at export, or None if the file has none."""
    try:
        return tuple(int(s) for s in json.loads(meta[META_SAMPLE_SHAPE]))
    except (KeyError, TypeError, ValueError):
        return None


def mismatches(inputs: list[Tensor], outputs: list[Tensor], sample_shape=None, out_channels: int | None = None,
               extra=None) -> list[str]:
    """What in a graph's (inputs, outputs) breaks the contract; [] when it conforms.

    An axis is an int (fixed), a str (a symbolic axis: its name, e.g. an ONNX dim_param) or None
    (dynamic, unnamed). The batch axis must not be fixed; a fixed axis must have the expected
    value; a symbolic one stands for any value (checked when the graph runs the load probe).
    Without ``sample_shape`` the C, H, W are not checked; without ``extra`` the extra inputs are
    taken from the graph (any of EXTRA_INPUTS, in order).
    """
    names = [n for n, _, _ in inputs]
    if extra is None:
        extra = tuple(n for n in names[2:] if n in EXTRA_INPUTS)
    c = h = w = out_c = None  # None: any value
    if sample_shape is not None:
        c, h, w = (int(s) for s in sample_shape)
        out_c = c if out_channels is None else int(out_channels)
    else:  # the graph's own fixed H and W, which its output must keep (its channels may be C or 2C)
        shape = dict((n, s) for n, _, s in inputs).get(SAMPLE, ())
        if len(shape) == 4:
            h, w = (s if isinstance(s, int) else None for s in shape[2:])
    sample = (BATCH_AXIS, c, h, w)
    want_in = [(SAMPLE, "float32", sample), (TIMESTEP, "int64", (BATCH_AXIS,))]
    want_in += [(n, "int64", (BATCH_AXIS,)) if is_integer(n) else (n, "float32", sample) for n in inputs_of(extra)[2:]]
    want_out = [(OUTPUT, "float32", (BATCH_AXIS, out_c, h, w))]
    problems = []
    for kind, want, got in (("input", want_in, inputs), ("output", want_out, outputs)):
        if [n for n, _, _ in got] != [n for n, _, _ in want]:
            problems.append(f"{kind}s are {[n for n, _, _ in got]}, expected {[n for n, _, _ in want]}")
            continue
        for (name, dtype, shape), (_, got_dtype, got_shape) in zip(want, got):
            if got_dtype != dtype:
                problems.append(f"{kind} {name!r} is {got_dtype}, expected {dtype}")
            if not _fits(tuple(got_shape), shape):
                problems.append(f"{kind} {name!r} has shape {_show(got_shape)}, expected {_show(shape)}")
    return problems


def _fits(got: tuple, want: tuple) -> bool:
    """Whether a graph axis list fits the spec's: the batch axis (BATCH_AXIS) not fixed, a fixed
    axis of the value wanted (a None in ``want``: any), a symbolic axis anywhere else."""
    if len(got) != len(want):
        return False
    for g, w in zip(got, want):
        if w == BATCH_AXIS:
            if isinstance(g, int):
                return False
        elif isinstance(g, int) and w is not None and g != w:
            return False
    return True


def _show(shape) -> str:
    """Axes as the graph names them: its own symbolic names, "?" for an unnamed dynamic axis."""
    return "[" + ", ".join(str(s) if isinstance(s, (int, str)) and s != "" else "?" for s in shape) + "]"


_ONNX_DTYPES = {1: "float32", 7: "int64", 10: "float16", 16: "bfloat16", 11: "float64", 6: "int32"}
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(float16)": "float16",
               "tensor(bfloat16)": "bfloat16", "tensor(double)": "float64", "tensor(int32)": "int32"}


def without_deep(inputs: list[Tensor], outputs: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """(inputs, outputs) of a full or shallow step's graph without ``DEEP``, and the ``DEEP``
    entries found (one, whose batch axis is not fixed, in a graph that follows the spec)."""
    deep = [v for v in (*inputs, *outputs) if v[0] == DEEP]
    return [v for v in inputs if v[0] != DEEP], [v for v in outputs if v[0] != DEEP], deep


def from_onnx(model) -> tuple[list[Tensor], list[Tensor]]:
    """(inputs, outputs) of an ``onnx.ModelProto``."""

    def one(v):
        tt = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        return (v.name, _ONNX_DTYPES.get(tt.elem_type, f"onnx type {tt.elem_type}"), dims)

    return [one(v) for v in model.graph.input], [one(v) for v in model.graph.output]


def from_session(session) -> tuple[list[Tensor], list[Tensor]]:
    """(inputs, outputs) of an ``onnxruntime.InferenceSession``."""

    def one(v):
        return (v.name, _ORT_DTYPES.get(v.type, v.type), tuple(s if isinstance(s, (int, str)) else None for s in v.shape))

    return [one(v) for v in session.get_inputs()], [one(v) for v in session.get_outputs()]


_OV_DTYPES = {"f32": "float32", "i64": "int64", "f16": "float16", "bf16": "bfloat16", "f64": "float64", "i32": "int32"}


def from_openvino(model) -> tuple[list[Tensor], list[Tensor]]:
    """(inputs, outputs) of an ``openvino.Model``."""

    def one(port):
        shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
        name = port.get_element_type().get_type_name()
        return (port.get_any_name(), _OV_DTYPES.get(name, name), shape)

    return [one(p) for p in model.inputs], [one(p) for p in model.outputs]
