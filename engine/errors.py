"""Typed errors raised at the API boundary.

Every error says what was wrong and what to do. They all derive from ``EngineError`` so a
service can catch one type; each also derives from the builtin a caller would expect
(``ValueError`` for bad arguments, ``ImportError`` for a missing package, ...).
"""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """An argument of a public call is out of range or of the wrong type."""


class ModelLoadError(EngineError, OSError):
    """A model folder or file is missing, corrupt, or belongs to another model."""


class MissingDependencyError(EngineError, ImportError):
    """An optional package is not installed; the message names the pip package to install."""

    def __init__(self, package: str, needed_for: str, extra: str | None = None):
        hint = f"pip install {package}" if extra is None else f"pip install '{package}' (or ddpm-engine[{extra}])"
        super().__init__(f"{needed_for} needs the package '{package}', which is not installed: {hint}")
        self.package = package


class BackendUnavailableError(EngineError, RuntimeError):
    """The requested backend cannot run on this machine or device (the message says why)."""


class ExportError(BackendUnavailableError):
    """The model could not be exported (an unsupported op, or a graph off the I/O spec)."""


class RequestTimeoutError(EngineError, TimeoutError):
    """A served request did not finish within its timeout; its rows were dropped."""


class QueueFullError(EngineError, RuntimeError):
    """The serving queue is at its bound; retry later or raise ``max_queue``."""


class EmulatedPrecisionWarning(UserWarning):
    """A reduced precision asked for runs emulated (no native bf16 / fp16 on this CPU): the numerics
    are those asked for, but it runs slower than fp32."""


QUOTE_LIMIT = 40  # characters of a user's value an error message quotes


def quote(value, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters: a message that echoes
    what a caller sent (a 5 MB sampler name, a list of a million seeds) quotes a short prefix and
    says how long the rest was, never the whole value."""
    if isinstance(value, (str, bytes, bytearray)):
        text = repr(value[:limit])
        if len(value) <= limit and len(text) <= limit + 3:
            return text
        unit = "characters" if isinstance(value, str) else "bytes"
        return f"{text[:limit + 3]}... ({len(value)} {unit})"  # a repr of escapes can be 10 times longer
    import reprlib

    short = reprlib.Repr()
    short.maxstring = short.maxother = short.maxlong = limit
    short.maxlevel, short.maxlist, short.maxtuple, short.maxdict, short.maxset = 3, 6, 6, 6, 6
    try:
        text = short.repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        return f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= limit + 3 else text[:limit] + "..."


def first_line(exc: BaseException) -> str:
    """An exception's first message line (its type name if it has no message): runtimes such as
    ONNX Runtime and OpenVINO raise many-line messages, and an engine error quotes the first."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def require(package: str, needed_for: str, extra: str | None = None):
    """Import ``package`` or raise MissingDependencyError naming what to install."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:  # the package or one of its own dependencies is absent
        pip_name = {"onnxruntime": "onnxruntime", "diffusers": "diffusers", "tensorrt": "tensorrt",
                    "triton": "triton", "onnx": "onnx", "sklearn": "scikit-learn", "sklearn.datasets": "scikit-learn",
                    "scipy.optimize": "scipy"}.get(package, package)
        raise MissingDependencyError(pip_name, needed_for, extra) from exc
