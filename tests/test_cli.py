"""The command line, in process: every user mistake is one line on stderr and exit code 2.

Plus one real subprocess run of the documented smoke command. Generating runs use the ``smoke``
preset on small crops so the whole file stays within seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gigasid.cli import main, parse_size
from gigasid.config import available_pipelines
from gigasid.errors import InputError
from gigasid.io.testing import deny_writes

REPO = Path(__file__).resolve().parent.parent
ROCKET = REPO / "examples" / "rocket.png"
FAST = ["--pipeline", "smoke", "--set", "min_short_side=24"]  # 2 scales, P = 7, T = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def crop(path: Path, box: tuple[int, int, int, int] = (40, 60, 104, 116)) -> Path:
    """A (left, upper, right, lower) crop of the rocket example: 64x56 by default."""
    Image.open(ROCKET).convert("RGB").crop(box).save(path)
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("gigasid: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- user mistakes ---------------------------------------------------------------------------


def test_text_file_named_png(tmp_path, capsys) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image\n")
    code, _, err = run_cli(capsys, "generate", fake, "-o", tmp_path / "out.png", *FAST)
    assert_user_error(code, err, "notes.png")
    assert not (tmp_path / "out.png").exists()


def test_missing_input(tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "generate", tmp_path / "nowhere.png", "-o", tmp_path / "out.png")
    assert_user_error(code, err, "nowhere.png", "does not exist")


def test_empty_input_folder(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "generate", tmp_path / "empty", "-o", tmp_path / "outs")
    assert_user_error(code, err, "no images")


def test_image_smaller_than_the_patch(tmp_path, capsys) -> None:
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((10, 10, 3), 128, np.uint8)).save(tiny)
    code, _, err = run_cli(capsys, "generate", tiny, "-o", tmp_path / "out.png")  # default: P = 15
    assert_user_error(code, err, "10x10", "patch size 15")


@pytest.mark.parametrize("size", ["12", "axb", "0x10", "10x0", "-5x10", "12x"])
def test_malformed_size(tmp_path, capsys, size: str) -> None:
    image = crop(tmp_path / "in.png")
    code, _, err = run_cli(capsys, "generate", image, "-o", tmp_path / "out.png", f"--size={size}", *FAST)
    assert_user_error(code, err, "--size", repr(size))


def test_parse_size() -> None:
    assert parse_size("256x512") == (256, 512)
    assert parse_size(" 48 X 96 ") == (48, 96)
    with pytest.raises(InputError):
        parse_size("48x")


def test_unknown_preset(tmp_path, capsys) -> None:
    image = crop(tmp_path / "in.png")
    code, _, err = run_cli(capsys, "generate", image, "-o", tmp_path / "out.png", "--pipeline", "nonesuch")
    assert_user_error(code, err, "nonesuch", *available_pipelines())


def test_unknown_set_key(tmp_path, capsys) -> None:
    image = crop(tmp_path / "in.png")
    code, _, err = run_cli(
        capsys, "generate", image, "-o", tmp_path / "out.png", *FAST, "--set", "index.kk=3"
    )
    assert_user_error(code, err, "index.kk")
    code, _, err = run_cli(capsys, "generate", image, "-o", tmp_path / "out.png", *FAST, "--set", "steps=3")
    assert_user_error(code, err, "steps")


@pytest.mark.parametrize(
    "override,needle",
    [
        ("eta=2", "eta=2"),
        ("patch_size=abc", "patch_size"),
        ("patch_size=8", "odd"),
        ("index.kind=hnsw", "index.kind"),
        ("num_steps=0", "num_steps"),
        ("eta", "key=value"),
    ],
)
def test_bad_set_value(tmp_path, capsys, override: str, needle: str) -> None:
    image = crop(tmp_path / "in.png")
    code, _, err = run_cli(capsys, "generate", image, "-o", tmp_path / "out.png", *FAST, "--set", override)
    assert_user_error(code, err, needle)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("eta=.nan", "eta"),
        ("rho=.nan", "rho"),
        ("output_scale=[1,.inf]", "output_scale"),
        ("num_scales=8", "num_scales"),
    ],
    ids=["eta-nan", "rho-nan", "output_scale-inf", "num_scales-too-deep"],
)
def test_bad_set_value_found_late(tmp_path, capsys, override: str, needle: str) -> None:
    """Values the config accepts but the job cannot use must still be a one-line user error.

    Today each of these escapes as a traceback (ValueError from the step, a NaN image refused by
    write_image, OverflowError in round(), ValueError from pyramid_shapes).
    """
    image = crop(tmp_path / "in.png")
    code, _, err = run_cli(capsys, "generate", image, "-o", tmp_path / "out.png", *FAST, "--set", override)
    assert_user_error(code, err, needle)
    assert not (tmp_path / "out.png").exists()


def test_output_directory_missing(tmp_path, capsys) -> None:
    image = crop(tmp_path / "in.png")
    code, _, err = run_cli(capsys, "generate", image, "-o", tmp_path / "no" / "such" / "out.png", *FAST)
    assert_user_error(code, err, "does not exist")


def test_output_directory_not_writable(tmp_path, capsys, monkeypatch) -> None:
    image = crop(tmp_path / "in.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    deny_writes(monkeypatch, locked)
    code, _, err = run_cli(capsys, "generate", image, "-o", locked / "out.png", *FAST)
    assert_user_error(code, err, "not writable")


@pytest.mark.parametrize("output", ["out.gif", "out"])
def test_output_format_unsupported(tmp_path, capsys, output: str) -> None:
    image = crop(tmp_path / "in.png")
    code, _, err = run_cli(capsys, "generate", image, "-o", tmp_path / output, *FAST)
    assert_user_error(code, err, "supported image format")


def test_output_size_too_small_for_the_pipeline(tmp_path, capsys) -> None:
    image = crop(tmp_path / "in.png")
    code, _, err = run_cli(capsys, "generate", image, "-o", tmp_path / "out.png", *FAST, "--size", "10x10")
    assert_user_error(code, err, "too small", "patch size 7")


def test_samples_must_be_positive(tmp_path, capsys) -> None:
    image = crop(tmp_path / "in.png")
    code, _, err = run_cli(capsys, "generate", image, "-o", tmp_path / "out.png", *FAST, "--samples", "0")
    assert_user_error(code, err, "--samples")


def test_folder_input_needs_folder_output(tmp_path, capsys) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    crop(folder / "a.png")
    code, _, err = run_cli(capsys, "generate", folder, "-o", tmp_path / "out.png", *FAST)
    assert_user_error(code, err, "folder")


# --- successful runs -------------------------------------------------------------------------


def test_folder_input_writes_one_output_per_image(tmp_path, capsys) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    crop(folder / "first.png", (0, 0, 64, 56))
    crop(folder / "second.png", (100, 120, 160, 168))  # 60x48
    (folder / "readme.txt").write_text("not an image, not picked up")
    outputs = tmp_path / "outputs"
    code, out, err = run_cli(capsys, "generate", folder, "-o", outputs, *FAST)
    assert code == 0, err
    assert sorted(p.name for p in outputs.iterdir()) == ["first.png", "second.png"]
    assert Image.open(outputs / "first.png").size == (64, 56)
    assert Image.open(outputs / "second.png").size == (60, 48)
    assert "total sampling" in out


def test_two_samples_differ(tmp_path, capsys) -> None:
    image = crop(tmp_path / "in.png")
    code, out, err = run_cli(
        capsys, "generate", image, "-o", tmp_path / "out.png", *FAST, "--samples", "2", "--seed", "5"
    )
    assert code == 0, err
    first, second = tmp_path / "out_0.png", tmp_path / "out_1.png"
    assert first.is_file() and second.is_file() and not (tmp_path / "out.png").exists()
    a = np.asarray(Image.open(first), dtype=np.float32)
    b = np.asarray(Image.open(second), dtype=np.float32)
    assert a.shape == b.shape == (56, 64, 3)
    assert np.abs(a - b).mean() > 5.0  # 8-bit levels: different samples, not round-off
    assert "seed 5" in out and "seed 6" in out


def test_size_option_sets_the_output_size(tmp_path, capsys) -> None:
    image = crop(tmp_path / "in.png")
    code, _, err = run_cli(
        capsys,
        "generate",
        image,
        "-o",
        tmp_path / "out.png",
        *FAST,
        "--size",
        "48x96",
        "--set",
        "application=retarget",
    )
    assert code == 0, err
    assert Image.open(tmp_path / "out.png").size == (96, 48)


def test_smoke_command_in_a_subprocess(tmp_path) -> None:
    output = tmp_path / "out.png"
    # OMP_NUM_THREADS=1 for the same reason as the one_thread fixture
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gigasid.cli",
            "generate",
            "examples/rocket.png",
            "-o",
            str(output),
            "--pipeline",
            "smoke",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    with Image.open(output) as written:
        assert written.format == "PNG"
        assert written.size == (248, 186)  # (width, height): 186 rows x 248 columns, as the input


# --- exports after a job (--export) and the export command -------------------------------------


def test_generate_exports_when_the_job_finishes(tmp_path, capsys) -> None:
    import tifffile

    from gigasid.io.store import JobStore

    image = crop(tmp_path / "in.png")
    store = tmp_path / "job.zarr"
    code, out, err = run_cli(
        capsys, "generate", image, "-o", store, *FAST, "--tile", 32,
        "--export", tmp_path / "out.ome.tif", "--export", tmp_path / "out.dzi",
    )
    assert code == 0, err
    assert "out.ome.tif: pyramidal OME-TIFF" in out and "out.dzi: DeepZoom" in out
    output = JobStore.open(store).array("output")[...]
    with tifffile.TiffFile(tmp_path / "out.ome.tif") as tiff:
        assert tiff.is_ome and tiff.is_bigtiff
        assert tiff.series[0].shape == (output.shape[1], output.shape[2], 3)
    assert (tmp_path / "out_files").is_dir()
    # the same store exports again without rebuilding anything
    code, out, err = run_cli(capsys, "export", store, tmp_path / "again.png")
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again.png")), output.transpose(1, 2, 0))
    assert "output pyramid built" not in out
    code, out, _ = run_cli(capsys, "info", store)
    assert code == 0 and "output pyramid: 6 of 6 reduced levels built" in out, out


def test_generate_export_needs_a_store_output(tmp_path, capsys) -> None:
    image = crop(tmp_path / "in.png")
    code, _, err = run_cli(capsys, "generate", image, "-o", tmp_path / "out.png", *FAST, "--export", tmp_path / "x.tif")
    assert_user_error(code, err, "--export exports a job store", "-o JOB.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


@pytest.mark.parametrize(("export", "needle"), [("out.gif", "not an export format"), ("no/such/out.tif", "does not exist")])
def test_generate_bad_export_fails_before_the_job(tmp_path, capsys, export, needle) -> None:
    image = crop(tmp_path / "in.png")
    code, _, err = run_cli(capsys, "generate", image, "-o", tmp_path / "job.zarr", *FAST, "--export", tmp_path / export)
    assert_user_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]  # no store was created
