"""Gaussian noise as a pure function of (seed, scale, step, channel, row, col).

A counter-based generator: every value is a hash of its key, so any box of the global noise field
can be produced on its own, in any order, on any worker, and a tiled run draws exactly the values
an in-memory run draws (DESIGN.md §4.3). The hash is SplitMix64's output function over a counter
built from the key; two 53-bit uniforms per value go through Box–Muller.
"""

from __future__ import annotations

import math

import torch

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
    """Standard normal noise (C, row1-row0, col1-col0), float32, for a half-open global box."""
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
