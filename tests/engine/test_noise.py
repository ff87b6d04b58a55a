"""The per-sample Philox stream: known answers, batch invariance, distribution."""

import random

import pytest
import torch

from ddpm_engine.errors import InvalidRequestError
from ddpm_engine.noise import check_seeds, KEY, initial_noise, philox4x32, philox_normal, seed_words


def words(*vals):
    return [torch.tensor([v], dtype=torch.int64) for v in vals]


@pytest.mark.parametrize("counter,key,expected", [
    # Random123's kat_vectors for philox4x32_10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_random123_known_answers(counter, key, expected):
    out = philox4x32(*words(*counter), *key)
    assert tuple(int(v) for v in out) == expected


def test_noise_is_batch_invariant_bitwise():
    seeds = [random.getrandbits(64) for _ in range(5)]
    alone = philox_normal(seed_words([seeds[2]]), 7, 300)
    batch = philox_normal(seed_words(seeds), 7, 300)
    shuffled = philox_normal(seed_words(seeds[::-1]), 7, 300)
    assert torch.equal(alone[0], batch[2]) and torch.equal(batch[2], shuffled[2])


def test_per_sample_steps_and_seed_words():
    s = [random.getrandbits(64), 2**64 - 1, 0]
    w = seed_words(s)
    assert w.tolist() == [[x & 0xFFFFFFFF, x >> 32] for x in s]
    per_sample = philox_normal(w, torch.tensor([3, 9, 3]), 64)
    assert torch.equal(per_sample[1], philox_normal(w[1:2], 9, 64)[0])
    assert not torch.equal(philox_normal(w, 3, 64)[0], philox_normal(w, 4, 64)[0])


def test_distribution_is_standard_normal():
    z = philox_normal(seed_words([random.getrandbits(64) for _ in range(16)]), 0, 4096).flatten()
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert abs((z > 1.96).float().mean().item() - 0.025) < 0.004
    assert (z > 3).any() and (z < -3).any()


def test_initial_noise_shape_and_key():
    x = initial_noise(seed_words([1, 2]), (3, 4, 5))
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32
    assert KEY == (0x5EED0DDB, 0x0D1FF05E)  # changing the key would change every user's images


@pytest.mark.parametrize("bad", [[-1], [2**64], [1.5], ["3"], [], [True]])
def test_bad_seeds(bad):
    with pytest.raises(InvalidRequestError):
        check_seeds(bad)


class _HostTensorOps:
    """A dispatch mode that records every op that reads or makes a CPU tensor."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        ops = self.ops = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if any(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in tree_flatten((args, out))[0]):
                    ops.append(str(func))
                return out

        self.mode = Mode()


def test_noise_on_a_device_touches_no_host_tensor():
    """Drawing noise for device tensors makes no CPU tensor and copies nothing host->device (a
    pageable copy per Philox round would sync, and cannot be captured in a CUDA graph). Run on
    the meta device, which stands in for CUDA here: any op on a CPU tensor shows up."""
    w = seed_words([random.getrandbits(64) for _ in range(3)], device="meta")
    i = torch.full((3,), 5, dtype=torch.int64, device="meta")
    rec = _HostTensorOps()
    with rec.mode:
        z = philox_normal(w, i, 48)
        x = initial_noise(w, (3, 4, 4))
    assert z.device.type == "meta" and x.shape == (3, 3, 4, 4)
    assert rec.ops == []

