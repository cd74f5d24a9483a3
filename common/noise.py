"""Seeded randomness that is a pure function of a key: the noise, sigma and caption dropout of a training sample
depend on (seed, step, index in the global batch) only, so a run gives the same numbers on 1 or N ranks and after
a resume, with no RNG state to save. The key goes through sha256 (Python's hash() of a str is salted per process)."""
import hashlib

import torch


def seed_of(*key):
    """A 63-bit seed from any repr-able key, the same in every process and on every machine."""
    return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 1


def generator(*key, device="cpu"):
    """A torch.Generator on `device` seeded by `key`. On CUDA the numbers differ from the CPU's (another RNG), but
    are the same on every run on the same kind of device, which is what an exact resume needs."""
    g = torch.Generator(device=device)
    g.manual_seed(seed_of(*key))
    return g


def randn(shape, *key, device="cpu"):
    """Standard normal noise of `shape`, drawn on `device` (no host-to-device copy) from the generator of `key`."""
    return torch.randn(shape, generator=generator(*key, device=device), device=device)
