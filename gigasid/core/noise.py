"""Gaussian noise as a pure function of (seed, scale, step, channel, row, col).

A counter-based generator: every value is a hash of its key, so any box of the global noise field
can be produced on its own, in any order, on any worker, and a tiled run draws exactly the values
an in-memory run draws (DESIGN.md §4.3). The hash is SplitMix64's output function over a counter
built from the key; two 53-bit uniforms per value go through Box–Muller.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# the CPU fast path; the torch code below is the reference and CUDA path
from gigasid.core.jit import numba, parallel_kernels

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def _mix_int(x: int) -> int:
    """SplitMix64's output function on a Python int (the scalar twin of :func:`_mix`)."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _stream_key(seed: int, scale: int, step: int, channel: int) -> int:
    key = 0
    for part in (seed, scale, step, channel):
        key = _mix_int(key * 31 + part + 1 + 0x9E3779B97F4A7C15)
    return _signed(key)


def gaussian_noise(
    seed: int,
    scale: int,
    step: int,
    channels: int,
    box: tuple[int, int, int, int],
    *,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal noise (C, row1-row0, col1-col0), float32, for a half-open global box.

    On the CPU the numba kernel draws it, elsewhere (or without numba) the torch code: the same
    integer hash and the same float64 Box–Muller, so the same float32 bits
    (tests/core/test_torch_twins.py). The one caveat: log and cos come from different libraries
    (libm, torch's vectorised CPU code, CUDA), which differ in the last float64 bit for ~0.1 % of
    arguments; that reaches the float32 result only when it straddles a rounding boundary, about
    once in 10^11 values.
    """
    if numba is not None and torch.device(device).type == "cpu":
        return _noise_compiled(seed, scale, step, channels, box)
    return _noise_torch(seed, scale, step, channels, box, device=device)


def _noise_compiled(seed: int, scale: int, step: int, channels: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The CPU path: one numba loop per channel plane."""
    row0, col0, row1, col1 = box
    keys = np.array([_stream_key(seed, scale, step, c) for c in range(channels)], dtype=np.int64)
    out = np.empty((channels, row1 - row0, col1 - col0), dtype=np.float32)
    # numba's workqueue threading layer must not be entered from two threads at once (core.jit)
    serial = not parallel_kernels()
    (_noise_serial if serial else _noise_parallel)(keys.view(np.uint64), row0, col0, out)
    return torch.from_numpy(out)


def _noise_torch(
    seed: int, scale: int, step: int, channels: int, box: tuple[int, int, int, int], *, device: torch.device | str
) -> torch.Tensor:
    """The reference and CUDA path: int64 tensors wrap like uint64, logical shifts are masked."""
    row0, col0, row1, col1 = box
    rows = torch.arange(row0, row1, dtype=torch.int64, device=device)[:, None]
    cols = torch.arange(col0, col1, dtype=torch.int64, device=device)[None, :]
    counter = ((rows << 32) + cols) << 1  # two draws per position
    planes = []
    for channel in range(channels):
        base = _stream_key(seed, scale, step, channel)
        first = _mix(counter * _GOLDEN + base)
        second = _mix((counter + 1) * _GOLDEN + base)
        u1 = (_shift_right(first, 11).to(torch.float64) + 0.5) / 2.0**53
        u2 = (_shift_right(second, 11).to(torch.float64) + 0.5) / 2.0**53
        planes.append(torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2))
    return torch.stack(planes).to(torch.float32)


if numba is not None:

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _mix_u64(x):
        x = (x ^ (x >> numba.uint64(30))) * numba.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> numba.uint64(27))) * numba.uint64(0x94D049BB133111EB)
        return x ^ (x >> numba.uint64(31))

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def _noise_plane(keys, row0, col0, out, c):
        """The torch code's arithmetic on uint64 (wrapping like its int64), one value at a time:
        no int64 temporaries, ~20× faster on a CPU."""
        golden = numba.uint64(0x9E3779B97F4A7C15)
        scale = 1.0 / 2.0**53
        two_pi = 2.0 * math.pi
        base = keys[c]
        for i in range(out.shape[1]):
            row = numba.uint64(row0 + i) << numba.uint64(32)
            for j in range(out.shape[2]):
                counter = (row + numba.uint64(col0 + j)) << numba.uint64(1)
                first = _mix_u64(counter * golden + base)
                second = _mix_u64((counter + numba.uint64(1)) * golden + base)
                u1 = (float(first >> numba.uint64(11)) + 0.5) * scale
                u2 = (float(second >> numba.uint64(11)) + 0.5) * scale
                out[c, i, j] = math.sqrt(-2.0 * math.log(u1)) * math.cos(two_pi * u2)

    @numba.njit(nogil=True, parallel=True, cache=True)
    def _noise_parallel(keys, row0, col0, out):
        for c in numba.prange(out.shape[0]):
            _noise_plane(keys, row0, col0, out, c)

    @numba.njit(nogil=True, cache=True)
    def _noise_serial(keys, row0, col0, out):
        for c in range(out.shape[0]):
            _noise_plane(keys, row0, col0, out, c)
