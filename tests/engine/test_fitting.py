"""Engine.fit_spacing (engine/fitting.py): a searched few-step spacing, its objective, its cache
and its refusals, on the bundled digits model (tiny searches: few seeds, few evaluations)."""

import json
from pathlib import Path

import pytest
import torch

from ddpm_engine import Engine, fitting
from ddpm_engine.errors import InvalidRequestError
from ddpm_engine.schedules import ExplicitSpacing, spaced_timesteps

pytestmark = pytest.mark.usefixtures("seeded", "cache")

SEEDS = [5_000_000, 5_000_001, 5_000_002, 5_000_003]
REFERENCE = ("dpmpp_2m", 20, "logsnr")  # a cheaper reference than the default's 50 steps, same kind
GRID = Path(__file__).resolve().parents[2] / "bench" / "results" / "quality-2026-12-03-torch-fp32-spacings.json"


@pytest.fixture(scope="module")
def engine():
    with Engine.from_pretrained("digits", backend="torch", batching=False) as e:
        yield e


def counting(engine, monkeypatch) -> list:
    """Record every engine.sample call from now on (the search samples through it)."""
    calls, sample = [], engine.sample
    monkeypatch.setattr(engine, "sample", lambda *a, **kw: calls.append(kw) or sample(*a, **kw))
    return calls


def distance(engine, seeds, spacing) -> float:
    """The search's objective, written out: mean L2 distance to the reference run's images."""
    ref = engine.sample(seeds, sampler=REFERENCE[0], steps=REFERENCE[1], spacing=REFERENCE[2]).double().flatten(1)
    images = engine.sample(seeds, sampler="ipndm", steps=5, spacing=spacing).double().flatten(1)
    return float((images - ref).norm(dim=1).mean())


def test_fit_is_an_explicit_spacing_closer_to_the_ode_than_leading(engine):
    fitted = engine.fit_spacing("ipndm", 5, seeds=SEEDS, reference=REFERENCE, max_evals=15)
    T = engine.num_train_timesteps
    assert isinstance(fitted, ExplicitSpacing)
    assert len(set(fitted.timesteps)) == 5 and all(0 <= t < T for t in fitted.timesteps)
    start = ExplicitSpacing(spaced_timesteps(T, 5, "leading", multistep=True))  # where the search starts
    assert fitted != start
    assert distance(engine, SEEDS, fitted) < 0.8 * distance(engine, SEEDS, start)
    # it is a spacing like any other: the same images as the explicit timesteps it holds
    torch.testing.assert_close(engine.sample(SEEDS[:2], sampler="ipndm", steps=5, spacing=fitted),
                               engine.sample(SEEDS[:2], sampler="ipndm", spacing=list(fitted.timesteps)))


def test_second_fit_reads_the_cache_and_samples_nothing(engine, monkeypatch, cache):
    first = engine.fit_spacing("ipndm", 3, seeds=SEEDS[:2], reference=REFERENCE, max_evals=6)
    calls = counting(engine, monkeypatch)
    assert engine.fit_spacing("ipndm", 3, seeds=SEEDS[:2], reference=REFERENCE, max_evals=6) == first
    assert calls == []
    files = sorted(cache.glob("fitted/*.json"))
    saved = [json.loads(f.read_text()) for f in files]
    assert any(s["timesteps"] == list(first.timesteps) and s["sampler"] == "ipndm" for s in saved)
    # other settings are another fit; refit searches again
    engine.fit_spacing("ipndm", 3, seeds=SEEDS[:2], reference=REFERENCE, max_evals=5)
    assert len(calls) > 1
    n = len(calls)
    assert engine.fit_spacing("ipndm", 3, seeds=SEEDS[:2], reference=REFERENCE, max_evals=6, refit=True) == first
    assert len(calls) > n


def test_corrupt_cache_file_is_refitted(engine, monkeypatch):
    args = dict(seeds=SEEDS[:2], reference=REFERENCE, max_evals=4)
    first = engine.fit_spacing("ipndm", 2, **args)
    path = fitting.cached_path(engine, "ipndm", 2, SEEDS[:2], REFERENCE, 4)
    path.write_text('{"timesteps": [1, 2')
    calls = counting(engine, monkeypatch)
    assert engine.fit_spacing("ipndm", 2, **args) == first
    assert calls and json.loads(path.read_text())["timesteps"] == list(first.timesteps)


@pytest.mark.parametrize("kw, words", [
    (dict(steps=0), r"steps in \[1, 10\]"), (dict(steps=11), r"steps in \[1, 10\]"), (dict(steps=True), "steps"),
    (dict(steps=5.0), "steps"), (dict(sampler="nope"), "nope"), (dict(sampler="ddpm"), "fresh noise"),
    (dict(sampler="dpmpp_2m_sde"), "fresh noise"), (dict(max_evals=0), "max_evals"),
    (dict(reference="dpmpp_2m"), "reference must be"), (dict(reference=("ddpm", 50, "leading")), "reference sampler"),
    (dict(seeds=[]), "seed"), (dict(seeds=[-1]), "seed"),
])
def test_refusals_are_typed_and_sample_nothing(engine, monkeypatch, kw, words):
    calls = counting(engine, monkeypatch)
    args = dict(sampler="ipndm", steps=5, seeds=SEEDS, reference=REFERENCE, max_evals=3) | kw
    with pytest.raises(InvalidRequestError, match=words):
        engine.fit_spacing(args.pop("sampler"), args.pop("steps"), **args)
    assert calls == []


def test_without_scipy_the_fit_names_what_to_install(engine, monkeypatch):
    import sys

    from ddpm_engine.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # its import fails, as where scipy is absent
    with pytest.raises(MissingDependencyError, match=r"scipy.*ddpm-engine\[fit\]"):
        engine.fit_spacing("ipndm", 5, seeds=SEEDS, reference=REFERENCE, max_evals=3, refit=True)


@pytest.mark.slow
def test_default_fit_reaches_the_five_step_target():
    """The default search (64 calibration seeds, the 50-step reference) gives iPNDM at 5 steps a
    Fréchet distance within 10% of DDPM-1000's on the quality grid's evaluation seeds."""
    from ddpm_engine.data import DigitsJudge

    ddpm_1000 = next(r["frechet"] for r in json.loads(GRID.read_text())["rows"]
                     if r["sampler"] == "ddpm" and r["steps"] == 1000)
    with Engine.from_pretrained("digits", backend="torch", batching=False) as e:
        fitted = e.fit_spacing("ipndm", 5)
        seeds = list(range(10_000, 11_000))
        images = torch.cat([e.sample(seeds[k:k + 250], sampler="ipndm", steps=5, spacing=fitted)
                            for k in range(0, 1000, 250)])
    assert DigitsJudge().frechet_distance(images) <= 1.1 * ddpm_1000
