"""The ``device`` option: a typed config key and ``gigasid generate --device``; cuda where torch
sees no CUDA device is one line and exit code 2 (CUDA itself: tests/core/test_torch_twins.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gigasid.cli import main
from gigasid.config import JobConfig, from_mapping
from gigasid.core.device import resolve_device
from gigasid.errors import ConfigError

ROCKET = Path(__file__).resolve().parent.parent / "examples" / "rocket.png"
NO_CUDA = "device: cuda was asked for but torch sees no CUDA device; use device: cpu or auto"


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_resolve_without_cuda(no_cuda) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError) as error:
        resolve_device("cuda")
    assert str(error.value) == NO_CUDA
    with pytest.raises(ConfigError, match="gpu.*cpu, cuda, auto"):
        resolve_device("gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resolve_with_cuda() -> None:
    assert resolve_device("cuda").type == "cuda"
    assert resolve_device("auto").type == "cuda"


def test_config_key() -> None:
    assert from_mapping(JobConfig, {}).device == "cpu"
    assert from_mapping(JobConfig, {"device": "auto"}).device == "auto"
    with pytest.raises(ConfigError) as error:
        from_mapping(JobConfig, {"device": "gpu"})
    assert "device" in str(error.value) and "cpu, cuda, auto" in str(error.value)


def _crop(path: Path) -> Path:
    Image.open(ROCKET).convert("RGB").crop((40, 60, 104, 116)).save(path)
    return path


@pytest.mark.parametrize("flags", [["--device", "cuda"], ["--set", "device=cuda"]], ids=["flag", "set"])
def test_cli_cuda_without_cuda_is_one_line(tmp_path, capsys, no_cuda, flags) -> None:
    code = main([
        "generate", str(_crop(tmp_path / "in.png")), "-o", str(tmp_path / "out.png"), "--pipeline", "smoke", *flags,
    ])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip() == f"gigasid: error: {NO_CUDA}"
    assert not (tmp_path / "out.png").exists()


def test_cli_device_flag_refuses_other_names(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_code:  # argparse's own usage error
        main(["generate", str(tmp_path / "in.png"), "-o", str(tmp_path / "out.png"), "--device", "gpu"])
    assert exit_code.value.code == 2
    assert "cpu" in capsys.readouterr().err


def test_cli_auto_without_cuda_is_the_cpu_run(tmp_path, capsys, no_cuda) -> None:
    image = _crop(tmp_path / "in.png")
    fast = ["--pipeline", "smoke", "--set", "min_short_side=24"]
    assert main(["generate", str(image), "-o", str(tmp_path / "cpu.png"), *fast]) == 0
    assert main(["generate", str(image), "-o", str(tmp_path / "auto.png"), *fast, "--device", "auto"]) == 0
    capsys.readouterr()
    cpu, auto = (np.asarray(Image.open(tmp_path / name)) for name in ("cpu.png", "auto.png"))
    assert np.array_equal(cpu, auto)
