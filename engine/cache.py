"""The on-disk cache of built artifacts: ONNX graphs, AOTInductor packages, TensorRT engines, OpenVINO blobs, the
compiled CUDA drivers. One place for where files go, how they are named, how they are written and
what happens to a file that does not load.

- ``folder(kind)``: ``$DDPM_ENGINE_CACHE/<kind>``, default ``~/.cache/ddpm-engine/<kind>``;
- ``key(parts)``: sha256 hex of the parts as canonical JSON (dict order does not matter; bytes
  are hashed first), stable across processes and machines;
- ``slug(name)``: a model name made safe for a file name;
- ``module_structure(module)``: what defines a module's function besides its weights (a key part):
  its layer tree, configs and code;
- ``artifact_path(kind, name, parts, suffix, tags)``: the one file name of a cached artifact,
  ``<kind folder>/<slug(name)>-<tag>-...-<key(parts)[:24]><suffix>``;
- ``write_bytes(path, data)`` / ``build(path, make)``: write under a temporary name in the same
  folder, then ``os.replace``, so a crash never leaves a half file that a later run would reuse,
  and a file that a running engine has mapped (an OpenVINO blob) never changes under it;
- ``load(path, make, open_)``: build the file if absent and open it; a cached file that fails to
  open is taken as corrupt (truncated, or written by another version): it is removed and rebuilt
  once, and an error on the fresh file is raised as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Callable, TypeVar

ENV = "DDPM_ENGINE_CACHE"
T = TypeVar("T")


def root() -> Path:
    """The cache's root folder: $DDPM_ENGINE_CACHE, else ~/.cache/ddpm-engine."""
    env = os.environ.get(ENV)
    return Path(env) if env else Path.home() / ".cache" / "ddpm-engine"


def folder(kind: str, cache_dir=None) -> Path:
    """Where artifacts of one kind go: ``cache_dir`` if given, else ``root() / kind``."""
    return Path(cache_dir) if cache_dir is not None else root() / kind


def _canonical(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"sha256": hashlib.sha256(bytes(value)).hexdigest()}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def key(parts: dict) -> str:
    """sha256 hex digest of ``parts`` (JSON-able values, or bytes) as canonical JSON."""
    text = json.dumps(_canonical(parts), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def slug(name: str, limit: int = 40) -> str:
    """``name`` with every run of characters outside [A-Za-z0-9_.-] made one '_', cut to ``limit``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))[:limit] or "model"


def module_structure(module) -> str:
    """What defines a module's function besides the weights: the layer tree, every ``config``
    dict (SeedUNet's, diffusers'), which hold settings not in the state dict (e.g. freq_shift),
    and the code (``module_code``): a graph exported before the forward was edited is not reused.
    A config's "_" keys are diffusers' bookkeeping (``_use_default_values`` lists a set's names in
    an order that changes per process, ``_name_or_path`` the folder): they decide nothing and are
    left out, so that every process finds the same cached graph."""
    configs = [{k: v for k, v in m.config.items() if not str(k).startswith("_")}
               for m in module.modules() if isinstance(getattr(m, "config", None), dict)]
    return repr(module) + json.dumps(configs, sort_keys=True, default=str) + module_code(module)


def module_code(module) -> str:
    """sha256 of the code of every class in the module tree: the source file that defines it
    (which holds its forward and the helper functions the forward calls), or, for a class with no
    file (defined in a notebook or by exec), the code objects of its methods."""
    import inspect
    import marshal

    h = hashlib.sha256()
    files = set()
    for cls in dict.fromkeys(type(m) for m in module.modules()):
        try:
            path = inspect.getsourcefile(cls)
        except TypeError:  # a built-in class
            path = None
        if path and path not in files and os.path.isfile(path):
            files.add(path)
            h.update(Path(path).read_bytes())
        elif not path or not os.path.isfile(path):
            for name, value in sorted(vars(cls).items()):
                code = getattr(value, "__code__", None)
                if code is not None:
                    h.update(name.encode() + marshal.dumps(code.replace(co_filename="", co_firstlineno=1)))
    return h.hexdigest()


def artifact_path(kind: str, name: str, parts: dict, suffix: str, tags=(), cache_dir=None) -> Path:
    """Where the artifact of model ``name`` keyed by ``parts`` goes: ``folder(kind, cache_dir) /
    "<slug(name)>-<tags...>-<first 24 hex digits of key(parts)><suffix>"``. The tags (a precision,
    a device type) only make the name readable; ``parts`` must hold everything that decides the
    artifact's content."""
    stem = "-".join([slug(name), *map(str, tags), key(parts)[:24]])
    return folder(kind, cache_dir) / f"{stem}{suffix}"


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


def build(path, make: Callable[[Path], None]) -> Path:
    """``path`` if it exists; else ``make(tmp)`` writes the artifact to a temporary file in the same
    folder, which is then renamed to ``path`` (atomic). The temporary file never outlives the call."""
    path = Path(path)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        make(tmp)
        if not tmp.is_file():
            raise FileNotFoundError(f"building {path.name} wrote no file")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename), replacing any old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(path, make: Callable[[Path], None], open_: Callable[[Path], T], corrupt=(Exception,)) -> T:
    """``open_(path)`` of the artifact, building it first (``build``) if absent. A cached file that
    ``open_`` rejects with one of the ``corrupt`` exception types is removed and rebuilt once; a
    freshly built file that fails to open raises that error."""
    path = Path(path)
    if path.is_file():
        try:
            return open_(path)
        except corrupt:  # a truncated or foreign cached file
            path.unlink(missing_ok=True)
    return open_(build(path, make))
