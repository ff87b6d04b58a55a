"""ddpm_engine.cache: the cache folder, stable keys, atomic writes, and rebuild of a corrupt file."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from ddpm_engine import cache


def test_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))
    assert cache.root() == tmp_path and cache.folder("onnx") == tmp_path / "onnx"
    assert cache.folder("onnx", tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.delenv("DDPM_ENGINE_CACHE")
    assert cache.root() == cache.Path.home() / ".cache" / "ddpm-engine"


def test_key_is_stable_across_processes_and_order_and_sees_every_part():
    n = random.getrandbits(32)
    parts = {"weights": "ab" * 32, "shape": [3, 32, 32], "n": n, "blob": b"\x00\x01", "nested": {"b": 1, "a": 2}}
    k = cache.key(parts)
    assert len(k) == 64 and set(k) <= set("0123456789abcdef") and k == cache.key(dict(reversed(list(parts.items()))))
    code = ("import sys, json; from ddpm_engine import cache; "
            f"print(cache.key({{'weights': 'ab' * 32, 'shape': (3, 32, 32), 'n': {n}, 'blob': b'\\x00\\x01', "
            "'nested': {'a': 2, 'b': 1}}))")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(random.randint(1, 1000))}).stdout.strip()
    assert other == k, n  # tuples key like lists; hash randomisation does not matter
    for change in ({"n": n + 1}, {"blob": b"\x00\x02"}, {"nested": {"a": 2, "b": 2}}, {"extra": None}):
        assert cache.key({**parts, **change}) != k, change


def test_key_of_json_parts_is_the_sha256_of_canonical_json():
    """The ONNX and AOTI caches keyed by sha256(json.dumps(parts, sort_keys=True)) before this module:
    the same parts still give the same key, so existing cache files stay valid."""
    import hashlib

    parts = {"weights": "x", "sample_shape": [1, 8, 8], "opset": 18, "torch": torch.__version__}
    assert cache.key(parts) == hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def test_slug():
    assert cache.slug("cifar10 / my model:v2") == "cifar10_my_model_v2"
    assert cache.slug("a" * 100) == "a" * 40 and cache.slug("") == "model" and cache.slug("ok-1.2_x") == "ok-1.2_x"


def test_artifact_path_names_the_model_the_tags_and_the_key(monkeypatch, tmp_path):
    """One naming rule for every cached artifact (ONNX graphs, OpenVINO blobs, AOTI packages,
    TensorRT plans, measured verdicts): <kind folder>/<slug(name)>-<tags>-<key[:24]><suffix>."""
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))
    parts = {"weights": "ab" * 32, "precision": "bf16", "n": random.getrandbits(32)}
    path = cache.artifact_path("aoti", "my model", parts, ".pt2", ("bf16", "cpu"))
    assert path == tmp_path / "aoti" / f"my_model-bf16-cpu-{cache.key(parts)[:24]}.pt2"
    assert cache.artifact_path("onnx", "m", parts, ".onnx").name == f"m-{cache.key(parts)[:24]}.onnx"
    assert cache.artifact_path("onnx", "m", parts, ".onnx", cache_dir=tmp_path / "mine").parent == tmp_path / "mine"
    assert cache.artifact_path("aoti", "my model", {**parts, "n": parts["n"] + 1}, ".pt2", ("bf16", "cpu")) != path


def test_module_structure_sees_configs_not_weights():
    from ddpm_engine.models import SeedUNet

    a, b = SeedUNet(1, (8, 16)), SeedUNet(1, (8, 16))
    assert cache.module_structure(a) == cache.module_structure(b)  # other random weights, same structure
    assert cache.module_structure(a) != cache.module_structure(SeedUNet(1, (8, 32)))


def test_a_diffusers_unets_structure_is_the_same_in_every_process():
    """diffusers' config lists ``_use_default_values`` from a set, in an order that follows the
    process's string hashing: two processes with other hash seeds must still agree on the key."""
    code = ("import hashlib; from ddpm_engine import cache; from ddpm_engine.models.cifar_unet import cifar10_unet; "
            "print(hashlib.sha256(cache.module_structure(cifar10_unet()).encode()).hexdigest())")
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2)}
    assert len(keys) == 1, keys


def test_write_bytes_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "a.bin"
    cache.write_bytes(target, b"old")
    data = os.urandom(1000)

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(cache.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        cache.write_bytes(target, data)
    assert target.read_bytes() == b"old" and sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]
    monkeypatch.undo()
    cache.write_bytes(target, data)
    assert target.read_bytes() == data and sorted(p.name for p in target.parent.iterdir()) == ["a.bin"]


def test_build_writes_once_through_a_temporary_file(tmp_path):
    target = tmp_path / "m.pt2"
    seen = []

    def make(tmp):
        seen.append(tmp)
        assert tmp.parent == target.parent and tmp.suffix == ".pt2" and tmp != target and not target.exists()
        tmp.write_bytes(b"built")

    assert cache.build(target, make) == target and cache.build(target, make) == target
    assert len(seen) == 1 and target.read_bytes() == b"built" and list(tmp_path.iterdir()) == [target]

    def fails(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("compiler crashed")

    with pytest.raises(RuntimeError, match="compiler crashed"):
        cache.build(tmp_path / "other.so", fails)
    assert list(tmp_path.iterdir()) == [target]  # neither the target nor the temporary file
    with pytest.raises(FileNotFoundError, match="wrote no file"):
        cache.build(tmp_path / "other.so", lambda tmp: None)


def _loader(opened):
    def open_(path):
        text = path.read_text()
        if text != "good":
            raise ValueError(f"corrupt: {text!r}")
        opened.append(path)
        return "loaded"

    return open_


def test_a_corrupt_file_is_removed_and_rebuilt_once(tmp_path):
    target = tmp_path / "engine.plan"
    builds, opened = [], []

    def make(tmp):
        builds.append(tmp)
        tmp.write_text("good")

    target.write_text("truncat")  # left by a crash of an older version, say
    assert cache.load(target, make, _loader(opened)) == "loaded"
    assert len(builds) == 1 and target.read_text() == "good" and opened == [target]
    assert cache.load(target, make, _loader(opened)) == "loaded" and len(builds) == 1  # reused


def test_a_fresh_file_that_fails_to_open_raises_and_other_errors_are_not_corruption(tmp_path):
    target = tmp_path / "x.so"
    builds = []

    def bad_make(tmp):
        builds.append(tmp)
        tmp.write_text("still bad")

    target.write_text("bad")
    with pytest.raises(ValueError, match="still bad"):
        cache.load(target, bad_make, _loader([]))
    assert len(builds) == 1  # rebuilt once, not in a loop

    target.write_text("good")

    def busy(path):
        raise MemoryError("out of device memory")

    with pytest.raises(MemoryError):
        cache.load(target, bad_make, busy, corrupt=(ValueError,))
    assert target.read_text() == "good" and len(builds) == 1  # not deleted: not a corrupt-file error
