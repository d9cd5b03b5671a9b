"""Where the denoisers' torch code runs: the ``device`` setting (cpu | cuda | auto) → a torch device.

Only the denoiser moves: its reference data lives on the device, inputs come from and results go
back to the caller's device (the engine reads and writes CPU arrays either way). On the CPU the
numba kernels run; on CUDA their torch twins do (tests/core/test_torch_twins.py holds the twins
equal on the CPU).
"""

from __future__ import annotations

import torch

from gigasid.errors import ConfigError

DEVICES = ("cpu", "cuda", "auto")


def resolve_device(name: str) -> torch.device:
    """``cpu`` → cpu; ``cuda`` → cuda (torch's current CUDA device), or a ConfigError where torch
    sees none; ``auto`` → cuda where torch sees a CUDA device, else cpu. Creates no CUDA context:
    the denoisers do, where they run."""
    if name not in DEVICES:
        raise ConfigError(f"device={name!r} is not valid; choose one of: {', '.join(DEVICES)}")
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "auto":
        return torch.device("cpu")
    raise ConfigError("device: cuda was asked for but torch sees no CUDA device; use device: cpu or auto")
