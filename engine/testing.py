"""Regression checks as a product: backends against eager PyTorch over the whole sampling chain,
and today's images against a golden file.

    from ddpm_engine.testing import compare, save_golden, compare_golden
    report = compare("digits", backends=["onnxruntime", "aoti"], sampler="ddim", steps=50)
    print(report)            # a table; report.passed, report.reason, report.to_json()

For each backend, against the reference (eager torch at fp32 unless ``reference=`` says otherwise):

- **network error on a shared trajectory**: the reference's own x_t at every step is fed to both
  model calls, so the sampler sees the same inputs on both sides and only the network is measured:
  ``err(t) = max|out - out_ref| / max|out_ref|`` over the batch at step t; the check reports the
  largest ``err(t)`` and the t where it peaks;
- **free-running error**: each side runs its own chain from the same seeds; the state after every
  step (x_t, ..., and last the image) is compared by max abs difference; "diverged at" names the
  first step whose output differs by more than ``atol``; the final images' max abs difference and
  PSNR (data range [-1, 1]);
- **NaN/Inf** in the model outputs or the chain, with the step where it appeared first.

A backend passes when ``max err(t) <= rtol``, every state of its chain is within ``atol`` of the
reference's, and everything is finite. Steps are named by their training timestep t.

Default tolerances (``DEFAULT_TOLERANCES``), by the precision under test (the reference stays
fp32), were chosen from measured errors of the CPU backends over DDIM / DDPM runs of the bundled
digits model, a small diffusers UNet and the CIFAR-10 UNet, with a wide margin over them, while
a 1% change of the network fails by far (docs/performance.md has the measurements):

- ``fp32``: rtol 1e-4, atol 1e-3;
- ``fp16``: rtol 5e-2, atol 0.1 (the largest network error is at t = 0, where the predicted noise
  is smallest);
- ``bf16``: rtol 0.2, atol 0.5: bf16's 8-bit mantissa, amplified by a deterministic chain. Read
  the PSNR column for a finer view;
- ``int8``: rtol 1.5, atol 1.5 (the data range is 2): a coarse bound that catches NaN, a wrong
  graph or a collapsed calibration, not a fine one (an untrained network's chain diverges even
  in bf16, so no tighter bound holds for every model; the measured errors: docs/regression.md).
  The PSNR column and the Fréchet distance of ``bench.quality`` say how good int8 is.

No GPU measured these (TensorRT's fp16 kernels may differ); pass ``atol`` / ``rtol`` to tighten.

Golden files (``save_golden`` / ``compare_golden``) hold one run step by step: every state, every
model output, the settings, the model's identity and the package versions, in one ``.npz``
(about ``steps x seeds x C x H x W x 8`` bytes). ``compare_golden`` runs the same settings now and
reports as above, the golden run standing in for the reference; a golden file of another model
(architecture, sample shape or scheduler) or of other settings is refused with
``GoldenMismatchError``. A model with other weights is compared (and fails): that is the check.

Memory: both sides keep every step's x_t on the host (``(steps + 1) x seeds x C x H x W`` floats).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import platform
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoints
from .backends.base import parse_precision, versions as backend_versions
from .engine import Engine
from .errors import BackendUnavailableError, InvalidRequestError
from .noise import check_seeds
from .plan import parse_device
from .samplers import check_eta

GOLDEN_FORMAT = "ddpm-engine-golden"
GOLDEN_VERSION = 1
DEFAULT_SEEDS = (0, 1, 2, 3)


@dataclass(frozen=True)
class Tolerance:
    rtol: float  # largest per-step network error, max|out - ref| / max|ref|
    atol: float  # largest max abs difference of any state of the chain (and of the images)


DEFAULT_TOLERANCES = {
    "fp32": Tolerance(rtol=1e-4, atol=1e-3),
    "fp16": Tolerance(rtol=5e-2, atol=0.1),
    "bf16": Tolerance(rtol=0.2, atol=0.5),
    "int8": Tolerance(rtol=1.5, atol=1.5),
}


class GoldenMismatchError(InvalidRequestError):
    """The golden file was made from another model (architecture, sample shape, scheduler) or with
    other settings than the ones asked for; the message says what differs."""


# ---- what identifies a model and a machine --------------------------------------------------------

def architecture_hash(module: torch.nn.Module) -> str:
    """sha256 of the state dict's names, shapes and dtypes: equal for two models of one architecture
    whatever their weights (``checkpoints.weights_hash`` covers the weights)."""
    layout = [(k, list(v.shape), str(v.dtype)) for k, v in sorted(module.state_dict().items())]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()


def model_identity(loaded: checkpoints.LoadedModel) -> dict:
    return {"name": loaded.name, "weights_hash": loaded.weights_hash,
            "architecture": architecture_hash(loaded.module), "sample_shape": list(loaded.sample_shape),
            "scheduler": loaded.scheduler.to_dict()}


def versions() -> dict:
    """Versions of what decides the numbers: ddpm_engine, the packages of ``backends.base.versions``
    that a run can use (torch, numpy, onnxruntime, onnx, openvino, diffusers), python and the CPU."""
    from . import __version__

    return {"ddpm_engine": __version__,
            **backend_versions(("torch", "numpy", "onnxruntime", "onnx", "openvino", "diffusers")),
            "python": platform.python_version(),
            "cpu": f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"}


# ---- one run, step by step ------------------------------------------------------------------------

@dataclass
class Trajectory:
    """One sampling run: ``timesteps`` in the order run (descending); ``states[0]`` is x_T and
    ``states[k + 1]`` the state after the step at ``timesteps[k]`` (the last is the image, clamped);
    ``outputs[k]`` the model output at that step (None when not recorded). Host tensors, float32."""

    timesteps: list
    states: torch.Tensor  # [N + 1, B, C, H, W]
    outputs: torch.Tensor | None  # [N, B, C, H, W]


def run_trajectory(engine: Engine, seeds, sampler: str, steps: int, eta: float,
                   with_outputs: bool = True) -> Trajectory:
    """Sample ``seeds`` keeping every step's x_t (``return_intermediates`` at every timestep snaps
    to each kept one); with ``with_outputs``, call the backend again on each x_t for its output."""
    images, snaps = engine.sample(list(seeds), sampler=sampler, steps=steps, eta=eta,
                                  return_intermediates=list(range(engine.num_train_timesteps)))
    snaps = sorted(snaps, key=lambda s: -s.t)
    states = torch.stack([s.x_t.float().cpu() for s in snaps] + [images.float().cpu()])
    outputs = None
    if with_outputs:
        outputs = torch.stack([engine.backend(s.x_t, _timestep(s.t, s.x_t)).float().cpu() for s in snaps])
    return Trajectory([int(s.t) for s in snaps], states, outputs)


def _timestep(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), int(t), dtype=torch.int64, device=x.device)


# ---- the report -----------------------------------------------------------------------------------

@dataclass
class BackendResult:
    """One backend's numbers against the reference; ``None`` where nothing was measured."""

    backend: str
    precision: str
    rtol: float
    atol: float
    network_error: float  # max over steps of max|out - ref| / max|ref| on the shared trajectory
    network_error_t: int  # the t where it peaks
    image_max_abs: float
    image_psnr_db: float  # inf when the images are identical
    trajectory_max_abs: float  # largest max abs difference of any state of the free-running chain
    diverged_t: int | None  # the first step whose output differs by more than atol
    diverged_step: int | None  # its number, 1 = the first step run
    steps: int
    nonfinite: str | None  # "model output at t=..." / "chain after the step at t=...", or None
    failures: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def reason(self) -> str:
        if self.passed:
            return (f"{self.backend} {self.precision}: within tolerance (network {_e(self.network_error)} <= rtol "
                    f"{_e(self.rtol)}, chain {_e(self.trajectory_max_abs)} <= atol {_e(self.atol)})")
        return f"{self.backend} {self.precision}: " + "; ".join(self.failures)


def _e(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.1e}"


def _psnr_text(x) -> str:
    return "inf" if x == math.inf else "nan" if math.isnan(x) else f"{x:.1f}"


def _json_safe(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # "inf" / "nan": JSON has no such numbers
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


@dataclass
class ParityReport:
    """What ``compare`` / ``compare_golden`` measured: ``passed``, ``reason``, ``table()``, ``to_json()``."""

    model: dict  # model_identity
    settings: dict  # sampler, steps, eta, seeds, device
    reference: str  # "torch fp32", or "golden FILE (torch fp32)"
    results: list  # [BackendResult]
    skipped: dict = field(default_factory=dict)  # backend -> why it could not run here
    notes: list = field(default_factory=list)  # e.g. versions that changed since a golden file
    versions: dict = field(default_factory=versions)

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def reason(self) -> str:
        if not self.results:
            return "no backend was checked" + (f" (skipped: {', '.join(self.skipped)})" if self.skipped else "")
        failed = [r for r in self.results if not r.passed]
        if not failed:
            skipped = f"; skipped: {', '.join(self.skipped)}" if self.skipped else ""
            return f"every backend within tolerance ({', '.join(f'{r.backend} {r.precision}' for r in self.results)}" \
                   f"{skipped})"
        return "; ".join(r.reason for r in failed)

    def table(self) -> str:
        s = self.settings
        shape = "x".join(map(str, self.model["sample_shape"]))
        lines = [f"parity check: {self.model['name']} (weights {self.model['weights_hash'][:12]}, {shape}), "
                 f"{s['sampler']}-{s['steps']} eta={s['eta']:g}, seeds {' '.join(map(str, s['seeds']))}, "
                 f"device {s['device']}",
                 f"reference: {self.reference}"]
        head = ("backend", "precision", "net err", "at t", "image max", "PSNR dB", "chain max", "diverged at",
                "NaN/Inf", "rtol", "atol", "verdict")
        rows = []
        for r in self.results:
            diverged = "-" if r.diverged_t is None else f"t={r.diverged_t} ({r.diverged_step}/{r.steps})"
            rows.append((r.backend, r.precision, _e(r.network_error),
                         "-" if r.network_error_t is None else str(r.network_error_t), _e(r.image_max_abs),
                         _psnr_text(r.image_psnr_db), _e(r.trajectory_max_abs), diverged, r.nonfinite or "-",
                         _e(r.rtol), _e(r.atol), "pass" if r.passed else "FAIL"))
        widths = [max(len(str(row[k])) for row in [head, *rows]) for k in range(len(head))]
        for row in [head, *rows]:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        for name, why in self.skipped.items():
            lines.append(f"skipped {name}: {why}")
        lines += self.notes
        lines.append(("PASS: " if self.passed else "FAIL: ") + self.reason)
        return "\n".join(lines)

    __str__ = table

    def to_dict(self) -> dict:
        results = [dict(asdict(r), passed=r.passed, reason=r.reason) for r in self.results]
        return {"passed": self.passed, "reason": self.reason, "model": self.model, "settings": self.settings,
                "reference": self.reference, "results": results, "skipped": self.skipped, "notes": self.notes,
                "versions": self.versions}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(_json_safe(self.to_dict()), indent=indent)


# ---- the measurements -----------------------------------------------------------------------------

def _network_error(engine: Engine, ref: Trajectory):
    """(max err(t), its t, first t with a non-finite output or None) on the reference's x_t."""
    worst, worst_t, nonfinite_t = 0.0, None, None
    for k, t in enumerate(ref.timesteps):
        x = ref.states[k].to(engine.device)
        out = engine.backend(x, _timestep(t, x)).float().cpu()
        want = ref.outputs[k]
        if nonfinite_t is None and not torch.isfinite(out).all():
            nonfinite_t = t
        err = float((out - want).abs().max() / want.abs().max().clamp_min(1e-30))
        if math.isnan(err) or err > worst:
            worst, worst_t = err, t
        if math.isnan(err):
            break
    return worst, worst_t, nonfinite_t


def _measure(engine: Engine, ref: Trajectory, seeds, sampler, steps, eta, tol: Tolerance) -> BackendResult:
    net_err, net_t, bad_out_t = _network_error(engine, ref)
    own = run_trajectory(engine, seeds, sampler, steps, eta, with_outputs=False)
    diffs = (own.states[1:] - ref.states[1:]).abs().flatten(1).amax(1)  # [N]: after each step
    finite = torch.isfinite(own.states[1:]).flatten(1).all(1)
    over = ((diffs > tol.atol) | diffs.isnan()).nonzero().flatten()
    div_k = int(over[0]) if len(over) else None
    bad_chain = (~finite).nonzero().flatten()
    img_diff = own.states[-1] - ref.states[-1]
    mse = float(img_diff.pow(2).mean())
    psnr = math.inf if mse == 0 else (10 * math.log10(4.0 / mse) if math.isfinite(mse) else math.nan)
    result = BackendResult(
        backend=engine.backend.name, precision=engine.backend.precision, rtol=tol.rtol, atol=tol.atol,
        network_error=net_err, network_error_t=net_t, image_max_abs=float(img_diff.abs().max()), image_psnr_db=psnr,
        trajectory_max_abs=float(diffs.max()), diverged_t=None if div_k is None else ref.timesteps[div_k],
        diverged_step=None if div_k is None else div_k + 1, steps=len(ref.timesteps), nonfinite=None)
    if bad_out_t is not None:
        result.nonfinite = f"model output at t={bad_out_t}"
    elif len(bad_chain):
        result.nonfinite = f"chain after the step at t={ref.timesteps[int(bad_chain[0])]}"
    if result.nonfinite:
        result.failures.append(f"NaN/Inf in the {result.nonfinite}")
    if not net_err <= tol.rtol:
        result.failures.append(f"network output differs by {_e(net_err)} (max rel, peak at t={net_t}) > rtol "
                               f"{_e(tol.rtol)}")
    if div_k is not None:
        result.failures.append(f"chain diverged past atol {_e(tol.atol)} at the step at t={result.diverged_t} "
                               f"(step {div_k + 1} of {result.steps}); final images max abs "
                               f"{_e(result.image_max_abs)}, PSNR {_psnr_text(psnr)} dB")
    return result


def _tolerance(precision: str, atol, rtol) -> Tolerance:
    parse_precision(precision)  # before the reference runs
    base = DEFAULT_TOLERANCES[precision]
    for name, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
            raise InvalidRequestError(f"{name} must be a finite number >= 0, got {value!r}")
    return Tolerance(rtol=base.rtol if rtol is None else float(rtol), atol=base.atol if atol is None else float(atol))


def _loaded(model) -> checkpoints.LoadedModel:
    """A model folder, bundled name, LoadedModel, or Engine -> LoadedModel."""
    if isinstance(model, Engine):
        return model.model
    if isinstance(model, torch.nn.Module):
        raise InvalidRequestError("wrap a bare nn.Module first: checkpoints.from_module(module, scheduler, "
                                  "sample_shape) or Engine.from_module(...), then pass that")
    return checkpoints.load(model)


def _settings(engine: Engine, sampler, steps, eta, seeds) -> dict:
    plan = engine.plan(sampler, steps, eta)  # the engine's one place for defaults and checks
    return {"sampler": sampler, "steps": plan.steps, "eta": plan.spec.eta, "seeds": check_seeds(seeds),
            "device": str(engine.device)}


def _engines(loaded, names, precision, device, exclude: str | None = None):
    """[(name, Engine, or the reason it cannot run)]. ``names="all"``: every backend usable on
    ``device`` except ``exclude``, those that cannot run there or at ``precision`` given as reasons;
    a backend named explicitly that cannot run raises (BackendUnavailableError)."""
    from . import backends

    if names == "all":
        out = []
        for name, why in backends.available(device, precision).items():
            if name == exclude:
                continue
            try:
                if why is not None:
                    raise BackendUnavailableError(why)
                out.append((name, Engine.from_pretrained(loaded, backend=name, device=device, precision=precision)))
            except BackendUnavailableError as exc:
                out.append((name, str(exc)))
        return out
    names = [names] if isinstance(names, str) else list(names or ())
    if not names:
        raise InvalidRequestError("name at least one backend to check, or backends='all'")
    return [(n, Engine.from_pretrained(loaded, backend=n, device=device, precision=precision)) for n in names]


# ---- the public checks ----------------------------------------------------------------------------

def compare(model, *, backends, reference="torch", precision="fp32", sampler="ddim", steps=50,
            seeds=DEFAULT_SEEDS, eta=0.0, atol=None, rtol=None, device=None) -> ParityReport:
    """Check each of ``backends`` (names, or "all": every backend usable here) at ``precision``
    against ``reference`` at fp32 over whole ``sampler``-``steps`` chains from ``seeds``.

    model: a model folder, a bundled name ("digits"), a ``checkpoints.LoadedModel`` or an Engine.
    atol / rtol: override the tolerances of ``precision`` (``DEFAULT_TOLERANCES``).
    Raises InvalidRequestError / BackendUnavailableError (EngineErrors) for what cannot be run.
    """
    loaded = _loaded(model)
    tol = _tolerance(precision, atol, rtol)
    device = parse_device(device)
    ref_engine = Engine.from_pretrained(loaded, backend=reference, device=device, precision="fp32")
    settings = _settings(ref_engine, sampler, steps, eta, seeds)
    tested = _engines(loaded, backends, precision, device, exclude=reference if precision == "fp32" else None)
    ref = run_trajectory(ref_engine, settings["seeds"], sampler, settings["steps"], eta)
    report = ParityReport(model_identity(loaded), settings, f"{ref_engine.backend.name} fp32", [])
    for name, engine in tested:
        if isinstance(engine, str):
            report.skipped[name] = engine
        else:
            report.results.append(_measure(engine, ref, settings["seeds"], sampler, settings["steps"], eta, tol))
    return report


def save_golden(model, path, *, sampler="ddim", steps=50, seeds=DEFAULT_SEEDS, eta=0.0, backend="torch",
                precision="fp32", device=None) -> Path:
    """Run ``model`` once and write the run (every state and model output), the settings, the
    model's identity and the package versions to ``path`` (``.npz``). Returns the path."""
    loaded = _loaded(model)
    engine = Engine.from_pretrained(loaded, backend=backend, device=device, precision=precision)
    settings = _settings(engine, sampler, steps, eta, seeds)
    run = run_trajectory(engine, settings["seeds"], sampler, settings["steps"], eta)
    meta = {"format": GOLDEN_FORMAT, "version": GOLDEN_VERSION, "model": model_identity(loaded),
            "settings": dict(settings, backend=engine.backend.name, precision=precision), "versions": versions()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, meta=np.array(json.dumps(meta)), timesteps=np.array(run.timesteps, dtype=np.int64),
                        states=run.states.numpy(), outputs=run.outputs.numpy())
    path.write_bytes(buf.getvalue())  # np.savez would append ".npz" to a path without it
    return path


def load_golden(path) -> tuple[dict, Trajectory]:
    """(meta, run) of a golden file; InvalidRequestError if it is missing or not a golden file."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"no golden file at {path}; write one with save_golden(...) or "
                                  "`python -m ddpm_engine check --save-golden FILE`")
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:  # np.load(path) leaks the file it fails on
            meta = json.loads(str(f["meta"]))
            run = Trajectory([int(t) for t in f["timesteps"]], torch.from_numpy(f["states"]),
                             torch.from_numpy(f["outputs"]))
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"{path} is not a readable golden file ({type(exc).__name__}: {exc}); "
                                  "write it again with save_golden") from None
    if meta.get("format") != GOLDEN_FORMAT or meta.get("version") != GOLDEN_VERSION:
        raise InvalidRequestError(f"{path} is not a {GOLDEN_FORMAT} file of version {GOLDEN_VERSION}")
    return meta, run


def _differences(name: str, golden, now) -> list[str]:
    """'name.key: golden A, this model B' for each differing entry (dicts compared key by key)."""
    if isinstance(golden, dict) and isinstance(now, dict):
        return [line for key in sorted(set(golden) | set(now), key=str)
                for line in _differences(f"{name}.{key}", golden.get(key, "absent"), now.get(key, "absent"))]
    return [] if golden == now else [f"{name}: golden {golden!r}, this model {now!r}"]


def _check_same_model(path, golden: dict, now: dict) -> None:
    differs = [line for key in ("sample_shape", "scheduler") for line in _differences(key, golden[key], now[key])]
    if golden["architecture"] != now["architecture"]:
        differs.append(f"architecture (layer names and shapes): golden {golden['architecture'][:12]}, "
                       f"this model {now['architecture'][:12]}")
    if differs:
        raise GoldenMismatchError(f"{path} was made from another model ({golden['name']!r}) than "
                                  f"{now['name']!r}: {'; '.join(differs)}; compare against a golden file of this "
                                  "model, or write one with save_golden")


def compare_golden(model, path, *, backend=None, precision=None, sampler=None, steps=None, seeds=None, eta=None,
                   atol=None, rtol=None, device=None) -> ParityReport:
    """Run the golden file's settings now with ``backend`` (a name or a list; default the golden's)
    at ``precision`` (default the golden's) and compare as ``compare`` does, the golden run being
    the reference. ``sampler`` / ``steps`` / ``seeds`` / ``eta``, if given, must match the golden's.

    Raises GoldenMismatchError if the golden file belongs to another model or other settings.
    """
    loaded = _loaded(model)
    meta, ref = load_golden(path)
    golden = meta["settings"]
    _check_same_model(path, meta["model"], model_identity(loaded))
    asked = {"sampler": sampler, "steps": steps, "eta": None if eta is None else check_eta(eta),
             "seeds": None if seeds is None else check_seeds(seeds)}
    differs = [f"{k}: golden {golden[k]!r}, asked {v!r}" for k, v in asked.items() if v is not None and v != golden[k]]
    if differs:
        raise GoldenMismatchError(f"{path} was made with other settings: {'; '.join(differs)}; leave them out to "
                                  "use the golden's, or write a new golden file")
    precision = golden["precision"] if precision is None else precision
    tol = _tolerance(precision, atol, rtol)
    device = parse_device(device)
    tested = _engines(loaded, golden["backend"] if backend is None else backend, precision, device)
    settings = {k: golden[k] for k in ("sampler", "steps", "eta", "seeds")}
    settings["device"] = str(device)
    report = ParityReport(model_identity(loaded), settings,
                          f"golden {Path(path).name} ({golden['backend']} {golden['precision']}, made on "
                          f"{golden['device']})", [])
    was = meta["model"]["weights_hash"]
    if was != loaded.weights_hash:
        report.notes.append(f"note: the weights differ from the golden's (golden {was[:12]}, "
                            f"now {loaded.weights_hash[:12]})")
    changed = [f"{k} {v} -> {report.versions.get(k)}" for k, v in meta["versions"].items()
               if report.versions.get(k) != v]
    if changed:
        report.notes.append("versions since the golden: " + ", ".join(changed))
    for name, engine in tested:
        if isinstance(engine, str):
            report.skipped[name] = engine
        else:
            report.results.append(_measure(engine, ref, golden["seeds"], golden["sampler"], golden["steps"],
                                           golden["eta"], tol))
    return report


# ---- pytest ---------------------------------------------------------------------------------------

def assert_parity(model, **kw) -> ParityReport:
    """``compare(model, **kw)``; raises AssertionError with the report's table unless it passed."""
    report = compare(model, **kw)
    if not report.passed:
        raise AssertionError("\n" + report.table())
    return report


def assert_matches_golden(model, path, **kw) -> ParityReport:
    """``compare_golden(model, path, **kw)``; raises AssertionError with the table unless it passed."""
    report = compare_golden(model, path, **kw)
    if not report.passed:
        raise AssertionError("\n" + report.table())
    return report
