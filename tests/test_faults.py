"""Fault injection (issue 13): bad input, damaged stores and failing disks never lose data and
never end in a traceback.

For every fault: the exit code, one line on stderr without "Traceback", no input changed, and,
where the store can be repaired, ``gigasid resume`` gives the undamaged run's pixels bit for bit.
Nothing here needs root: a full disk is an ``ENOSPC``-raising shim around the writer concerned,
a read-only disk one around ``os.open``/``os.access``, an unreachable scheduler a closed port.

Jobs are the ``smoke`` preset (2 scales, P = 7, T = 3) with eta = 0.5 on a 48x64 crop, tile 24
(2x3 tiles at scale 0), run in process with the ``sync`` profile; the latent job is the
``gigapixel`` preset shrunk as in ``tests/graph/test_latent.py``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import pyvips
import torch
from PIL import Image

from gigasid.cli import main
from gigasid.config import load_pipeline
from gigasid.errors import StoreDamagedError
from gigasid.graph import engine
from gigasid.graph.profiles import load_profile
from gigasid.io.disk import owner_tag
from gigasid.io.images import read_image
from gigasid.io.store import JobStore

REPO = Path(__file__).resolve().parent.parent
ROCKET = REPO / "examples" / "rocket.png"
COFFEE = REPO / "examples" / "coffee.png"
SETTINGS = ["min_short_side=24", "eta=0.5"]
SMOKE = ["--pipeline", "smoke", *[a for s in SETTINGS for a in ("--set", s)]]
SEEDED = [*SMOKE, "--seed", 3]  # the seed of the stores made in process (make_store)
LATENT = ["patch_size=5", "num_steps=3", "min_short_side=10", "latent.channels=16", "index.kind=auto"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- helpers -----------------------------------------------------------------------------------


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    torch.set_num_threads(1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(code: int, err: str, *needles: str) -> str:
    """The fault was reported as a user error: exit 2, one line, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "tiles/s" not in line]
    errors = [line for line in lines if line.startswith("gigasid: error: ")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what "no input changed" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def crop(path: Path, box=(40, 40, 104, 88)) -> Path:
    Image.open(ROCKET).convert("RGB").crop(box).save(path)
    return path


def tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(read_image(path)).permute(2, 0, 1).contiguous() * 2.0 - 1.0


class StopAfter(engine.Progress):
    """A progress display that interrupts the job after ``count`` tiles (a stopped run)."""

    def __init__(self, count: int):
        super().__init__()
        self.count = count

    def tick(self) -> None:
        self.count -= 1
        if self.count == 0:
            raise KeyboardInterrupt
        super().tick()


def make_store(path: Path, image: torch.Tensor, *, stop: int | None = None, pipeline="smoke", settings=SETTINGS,
               size=None, tile=24) -> Path:
    """A job store, run to the end or stopped after ``stop`` tiles; unlocked."""
    store = engine.create_job(path, image, load_pipeline(pipeline, settings), size=size, seed=3, tile=tile)
    try:
        engine.execute(store, load_profile("sync"), progress=StopAfter(stop or -1))
    except KeyboardInterrupt:
        pass
    finally:
        store.release_lock()
    torch.set_num_threads(1)
    return path


def damage(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    elif how == "bitflip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    else:
        raise ValueError(how)


def output(path: Path) -> np.ndarray:
    return engine.read_output(JobStore.open(path))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference(workdir) -> Path:
    return crop(workdir / "ref.png")


@pytest.fixture(scope="module")
def finished(workdir, reference) -> Path:
    """A finished store with an output pyramid (built by an export)."""
    path = make_store(workdir / "finished.zarr", tensor(reference))
    assert main(["export", str(path), str(workdir / "first.png")]) == 0
    return path


@pytest.fixture(scope="module")
def stopped(workdir, reference) -> Path:
    """Stopped in scale 0's step 2: scale 1 (2 tiles x 4 stages) finished, stages 0-1 of scale 0
    (6 tiles each) done, and 3 of step 2's 6 tiles."""
    path = make_store(workdir / "stopped.zarr", tensor(reference), stop=2 * 4 + 6 * 2 + 3)
    store = JobStore.open(path)
    assert store.manifest["scales_done"] == [1] and store.manifest["status"] == "running"
    assert int(store.array("scales/0/done")[2].sum()) == 3
    return path


@pytest.fixture(scope="module")
def latent(workdir) -> Path:
    """A finished latent job (lapped PCA codec, correspondence decode)."""
    return make_store(workdir / "latent.zarr", tensor(COFFEE), pipeline="gigapixel", settings=LATENT,
                      size=(200, 296), tile=18)


@pytest.fixture
def copy(tmp_path):
    def make(source: Path) -> Path:
        target = tmp_path / source.name
        shutil.copytree(source, target)
        return target

    return make


# --- 1. output equal to an input -------------------------------------------------------------


def test_output_equal_to_the_input_is_refused_before_computing(tmp_path, capsys) -> None:
    victim = crop(tmp_path / "victim.png")
    before = victim.read_bytes()
    code, _, err = run_cli(capsys, "generate", victim, "-o", victim, *SMOKE)
    one_line(code, err, "is the input", "victim.png")
    (tmp_path / "link.png").symlink_to(victim)
    code, _, err = run_cli(capsys, "generate", tmp_path / "link.png", "-o", tmp_path / "sub" / ".." / "victim.png", *SMOKE)
    one_line(code, err, "is the input")
    code, _, err = run_cli(capsys, "generate", victim, "-o", tmp_path / "j.zarr", *SMOKE, "--export", victim)
    one_line(code, err, "is the input")
    assert victim.read_bytes() == before and not (tmp_path / "j.zarr").exists()


def test_a_folder_output_onto_its_inputs_is_refused(tmp_path, capsys) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    crop(photos / "a.png")
    crop(photos / "b.jpg", (0, 0, 64, 56))
    before = snapshot(photos)
    for target in (photos, tmp_path / "photos" / ".." / "photos"):
        code, out, err = run_cli(capsys, "generate", photos, "-o", target, *SMOKE)
        one_line(code, err, "is the input", "a.png")
        assert "total sampling" not in out  # refused before anything was computed
    assert snapshot(photos) == before


# --- 2. several inputs with one name stem ----------------------------------------------------


def test_same_stem_in_several_formats_gets_one_output_each(tmp_path, capsys) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    crop(folder / "x.png")
    crop(folder / "x.jpg", (0, 0, 64, 48))
    crop(folder / "x.tif", (100, 100, 164, 148))
    crop(folder / "y.png")
    code, _, err = run_cli(capsys, "generate", folder, "-o", tmp_path / "out", *SMOKE)
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["x_jpg.png", "x_png.png", "x_tif.png", "y.png"]
    outputs = [np.asarray(Image.open(tmp_path / "out" / n)) for n in names[:3]]
    assert not np.array_equal(outputs[0], outputs[1]) and not np.array_equal(outputs[1], outputs[2])


def test_outputs_that_would_still_collide_are_refused(tmp_path, capsys) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    crop(folder / "x.png")
    crop(folder / "x.jpg")
    crop(folder / "x_jpg.png")  # its plain output name is x.jpg's renamed one
    code, out, err = run_cli(capsys, "generate", folder, "-o", tmp_path / "out", *SMOKE)
    one_line(code, err, "two outputs", "x_jpg.png")
    assert "total sampling" not in out and not (tmp_path / "out").exists()  # before computing anything


# --- 3. missing, truncated and corrupt chunks --------------------------------------------------

STOPPED_FAULTS = {
    # key: what the repair has to do
    "scales/1/final/c/0/0/1": "a finished scale's final tile: its last stage again",
    "scales/0/x0/c/0/{done}": "a chunk the stage in progress wrote (step 2 writes x0): that tile again",
    "scales/0/x1/c/0/1/2": "what step 2 reads (step 1's x1): the whole scale again",
    "scales/0/done/c/1/0/0": "a done-grid: the whole scale again",
    "index/0/index.bin": "an index file: rebuilt from the reference",
    "index/1/candidates.pt": "an index file: rebuilt from the reference",
}


@pytest.mark.parametrize("key", sorted(STOPPED_FAULTS))
@pytest.mark.parametrize("how", ["missing", "empty", "bitflip"])
def test_damage_in_a_stopped_job_is_recomputed_bit_for_bit(finished, stopped, copy, capsys, key, how) -> None:
    store = copy(stopped)
    i, j = np.argwhere(JobStore.open(store).array("scales/0/done")[2])[0]
    key = key.format(done=f"{i}/{j}")
    damage(store / key, how)
    code, out, err = run_cli(capsys, "check", store)
    line = one_line(code, err, key, "gigasid resume")
    assert key in out
    code, out, err = run_cli(capsys, "resume", store)
    assert code == 0, err
    assert "1 damaged" in err and "complete" in out
    assert np.array_equal(output(store), output(finished))
    code, out, err = run_cli(capsys, "check", store)
    assert code == 0 and "no damage" in out, (line, err)


@pytest.mark.parametrize(
    "key", ["output/c/0/1/1", "output/c/0/0/2", "output_pyramid/1/c/0/0/0", "output_pyramid/3/c/0/0/0",
            "output_done/c/0/0", "scales/0/final/c/0/1/0"],
)
@pytest.mark.parametrize("how", ["missing", "truncated", "bitflip"])
def test_damage_in_a_finished_store(finished, copy, capsys, tmp_path, key, how) -> None:
    store = copy(finished)
    damage(store / key, how)
    expected = output(finished)
    reads_image = key.startswith(("output/", "output_pyramid/"))
    if reads_image:  # an export names every damaged chunk of the image and the repair
        code, _, err = run_cli(capsys, "export", store, tmp_path / "out.dzi")  # DeepZoom reads every level
        one_line(code, err, key, f"gigasid resume {store}")
        assert not list(tmp_path.glob("*out*"))  # nothing written, no temporary left
        code, _, err = run_cli(capsys, "view", store, "--port", "1")
        one_line(code, err, key, "gigasid resume")
    code, _, err = run_cli(capsys, "check", store)
    one_line(code, err, key)
    code, _, err = run_cli(capsys, "resume", store)
    assert code == 0, err
    assert np.array_equal(JobStore.open(store).array("output")[...], expected)
    code, _, err = run_cli(capsys, "export", store, tmp_path / "again.png")
    assert code == 0, err
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again.png")), expected.transpose(1, 2, 0))
    assert run_cli(capsys, "check", store)[0] == 0


def test_a_missing_chunk_is_an_error_not_the_fill_value(finished, copy) -> None:
    store = copy(finished)
    (store / "output/c/0/1/1").unlink()
    with pytest.raises(StoreDamagedError, match=r"output/c/0/1/1 \(missing\)"):
        JobStore.open(store).array("output")[...]
    (store / "output/c/0/0/0").write_bytes(b"")  # a 0-byte chunk: no codec traceback either
    with pytest.raises(StoreDamagedError, match=r"output/c/0/0/0 \(truncated"):
        JobStore.open(store).array("output")[:, :24, :24]


@pytest.mark.parametrize("key", ["reference/0/c/0/0/0", "reference/1/c/0/0/0"])
def test_damage_only_the_source_can_repair_is_said_so(stopped, copy, capsys, key) -> None:
    store = copy(stopped)
    damage(store / key, "bitflip")
    before = JobStore.open(store).manifest
    code, _, err = run_cli(capsys, "resume", store)
    one_line(code, err, key, "cannot be recomputed", "source image")
    assert JobStore.open(store).manifest["scales_done"] == before["scales_done"]
    assert not (store / ".lock").exists()


@pytest.mark.parametrize(
    "key", ["scales/0/matches/c/0/0/0", "scales/0/weights/c/1/1/0", "scales/0/final/c/0/0/1", "latent/1/c/0/0/0",
            "codec/basis/c/0/0"],
)
def test_latent_store_damage(latent, copy, capsys, key) -> None:
    store = copy(latent)
    expected = output(latent)
    damage(store / key, "bitflip")
    code, _, err = run_cli(capsys, "resume", store)
    if key.startswith("codec/"):  # fitted on the reference: refitting is not promised to give its bits
        one_line(code, err, key, "cannot be recomputed")
        return
    assert code == 0 and "1 damaged" in err, err
    assert np.array_equal(output(store), expected)
    damage(store / key, "missing")  # and with the output to rebuild from it
    damage(store / "output/c/0/0/0", "missing")
    code, _, err = run_cli(capsys, "resume", store)
    assert code == 0 and "2 damaged" in err, err
    assert np.array_equal(output(store), expected)


def test_a_damaged_reference_is_read_again_from_its_unchanged_source(tmp_path, reference, finished, capsys) -> None:
    source = tmp_path / "source.png"
    shutil.copy(reference, source)
    store = tmp_path / "j.zarr"
    code, _, err = run_cli(capsys, "generate", source, "-o", store, *SEEDED, "--tile", 24)
    assert code == 0, err
    for key in ("reference/0/c/0/0/0", "reference/1/c/0/0/0"):
        damage(store / key, "bitflip")
    damage(store / "output/c/0/0/0", "missing")  # so that the reference is needed again
    code, _, err = run_cli(capsys, "resume", store)
    assert code == 0 and "read again from" in err, err
    assert np.array_equal(output(store), output(finished))
    assert run_cli(capsys, "check", store)[0] == 0
    # the source changed since: the reference cannot be had back from it
    damage(store / "reference/0/c/0/0/0", "missing")
    crop(source, (0, 0, 64, 48))
    code, _, err = run_cli(capsys, "resume", store)
    one_line(code, err, "reference/0/c/0/0/0", "cannot be recomputed", "source image")


def test_retargets_given_coarsest_scale_is_rewritten(tmp_path, reference, copy, capsys) -> None:
    settings = [*SETTINGS, "application=retarget"]
    size = (48, 96)
    whole = make_store(tmp_path / "whole.zarr", tensor(reference), settings=settings, size=size)
    store = make_store(tmp_path / "stopped.zarr", tensor(reference), settings=settings, size=size, stop=3)
    coarsest = len(JobStore.open(store).manifest["output_shapes"]) - 1
    damage(store / f"scales/{coarsest}/final/c/0/0/0", "bitflip")
    code, _, err = run_cli(capsys, "resume", store)
    assert code == 0 and "given coarsest" in err, err
    assert np.array_equal(output(store), output(whole))


# --- 4. garbage, empty and wrongly typed manifests -----------------------------------------------


def _garble(store: Path, how: str) -> None:
    meta = store / "zarr.json"
    if how == "garbage":
        meta.write_bytes(b"\x00\xff{{ not json")
    elif how == "empty":
        meta.write_bytes(b"")
    else:
        data = json.loads(meta.read_text())
        manifest = data["attributes"]["gigasid"]
        if how == "wrong-types":
            manifest["output_shapes"], manifest["tile"] = "56x64", "24"
        elif how == "null-list":
            manifest["scales_done"] = None
        elif how == "missing-key":
            del manifest["seed"]
        elif how == "not-a-group":
            data["node_type"] = "array"
        meta.write_text(json.dumps(data))


@pytest.mark.parametrize("how", ["garbage", "empty", "wrong-types", "null-list", "missing-key", "not-a-group"])
@pytest.mark.parametrize("command", ["info", "resume", "check", "export", "view"])
def test_a_damaged_manifest_is_one_line_for_every_command(finished, copy, capsys, tmp_path, how, command) -> None:
    store = copy(finished)
    _garble(store, how)
    before = snapshot(store)
    args = {"export": [tmp_path / "out.png"], "view": ["--port", "1"]}.get(command, [])
    code, _, err = run_cli(capsys, command, store, *args)
    one_line(code, err, str(store))
    assert snapshot(store) == before


WRONG_VALUES = {"null": None, "text": "x", "int": 7, "negative": -1, "list": [], "dict": {}, "float": 1.5,
                "bool": True, "nested": [[1, "a"]], "mapping of text": {"0": "x", "levels_done": "x"}}


def test_any_wrong_value_of_any_manifest_key_is_one_line_or_harmless(finished, tmp_path, capsys) -> None:
    """Every key of a finished job's manifest, replaced by a value of every other kind: each
    command exits 0 (the value was not needed, or resume repaired what it implied) or with one
    line; no exception escapes (before: TypeError, KeyError, IndexError, ValueError)."""
    manifest = JobStore.open(finished).manifest
    for key in manifest:
        for kind, value in WRONG_VALUES.items():
            store = tmp_path / f"{key}-{kind}.zarr"
            shutil.copytree(finished, store)
            meta = json.loads((store / "zarr.json").read_text())
            meta["attributes"]["gigasid"][key] = value
            (store / "zarr.json").write_text(json.dumps(meta))
            for command in (["info"], ["check"], ["export", tmp_path / "out.png"], ["resume", "--scheduler", "sync"]):
                code, _, err = run_cli(capsys, command[0], store, *command[1:])
                if code != 0:
                    one_line(code, err)
            shutil.rmtree(store)


@pytest.mark.parametrize("array", ["output", "output_done", "scales/0/final", "reference/0", "scales/1/done"])
def test_unreadable_array_metadata_is_one_line(finished, copy, capsys, array) -> None:
    store = copy(finished)
    (store / array / "zarr.json").write_text("garbage{")
    code, _, err = run_cli(capsys, "check", store)
    one_line(code, err, f"{array}/zarr.json")


# --- 5. non-UTF-8 presets ---------------------------------------------------------------------


def test_non_utf8_pipeline_and_scheduler_files(tmp_path, reference, capsys) -> None:
    pipeline = tmp_path / "latin1.yaml"
    pipeline.write_bytes("num_steps: 3  # caf\u00e9\n".encode("latin-1"))
    code, _, err = run_cli(capsys, "generate", reference, "-o", tmp_path / "out.png", "--pipeline", pipeline)
    one_line(code, err, "latin1.yaml", "UTF-8", "0xe9")
    profile = tmp_path / "sched.yaml"
    profile.write_bytes(b"kind: sync\n# \xff\xfe\n")
    code, _, err = run_cli(capsys, "generate", reference, "-o", tmp_path / "j.zarr", *SMOKE, "--scheduler", profile)
    one_line(code, err, "sched.yaml", "UTF-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.yaml", "sched.yaml"]
    (tmp_path / "folder.yaml").mkdir()
    code, _, err = run_cli(capsys, "generate", reference, "-o", tmp_path / "out.png", "--pipeline", tmp_path / "folder.yaml")
    one_line(code, err, "folder.yaml", "is a folder")


# --- 6. an unreachable cluster ---------------------------------------------------------------


def test_an_unreachable_scheduler_is_one_line_within_its_timeout(tmp_path, reference, finished, capsys) -> None:
    profile = tmp_path / "cluster.yaml"
    profile.write_text("kind: cluster\naddress: tcp://127.0.0.1:1\nconnect_timeout: 1\n")
    store = tmp_path / "j.zarr"
    started = time.monotonic()
    code, _, err = run_cli(capsys, "generate", reference, "-o", store, *SEEDED, "--tile", 24, "--scheduler", profile)
    one_line(code, err, "tcp://127.0.0.1:1", "within 1 s", "connect_timeout", "gigasid resume")
    assert time.monotonic() - started < 25
    code, _, err = run_cli(capsys, "resume", store, "--scheduler", "sync")  # the store was kept
    assert code == 0, err
    assert np.array_equal(output(store), output(finished))


def test_connect_timeout_is_validated(tmp_path) -> None:
    from gigasid.errors import ConfigError

    profile = tmp_path / "cluster.yaml"
    profile.write_text("kind: cluster\naddress: tcp://127.0.0.1:1\nconnect_timeout: -3\n")
    with pytest.raises(ConfigError, match="connect_timeout"):
        load_profile(str(profile))


# --- 7. a full disk (ENOSPC shims) -------------------------------------------------------------


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_after(monkeypatch, count: int) -> None:
    """Zarr chunk and metadata writes fail with ENOSPC after ``count`` succeed."""
    import zarr.storage._local as local

    real = local._put
    left = [count]

    def put(path, value, *args, **kwargs):
        left[0] -= 1
        if left[0] < 0:
            _enospc()
        return real(path, value, *args, **kwargs)

    monkeypatch.setattr(local, "_put", put)


@pytest.mark.parametrize("where", ["store", "faiss"])
def test_a_full_disk_while_creating_a_store_leaves_nothing(tmp_path, reference, monkeypatch, capsys, where) -> None:
    if where == "store":
        _fail_after(monkeypatch, 10)
    else:  # as FAISS reports it: a RuntimeError whose text carries the errno
        import faiss

        def write_index(*_args):
            raise RuntimeError("Error in faiss::FileIOWriter: write error ... No space left on device")

        monkeypatch.setattr(faiss, "write_index", write_index)
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "generate", reference, "-o", tmp_path / "j.zarr", *SMOKE, "--tile", 24)
    one_line(code, err, "is full", str(tmp_path))
    assert snapshot(tmp_path) == before  # no store, no .j.zarr.creating


def test_a_full_disk_during_a_job_keeps_the_store_for_resume(tmp_path, reference, finished, monkeypatch, capsys) -> None:
    store = tmp_path / "j.zarr"
    import zarr.storage._local as local

    real = local._put
    state = {"armed": False, "left": 25}

    def put(path, value, *args, **kwargs):  # the job's writes, not the store's creation, fail
        if state["armed"]:
            state["left"] -= 1
            if state["left"] < 0:
                _enospc()
        return real(path, value, *args, **kwargs)

    real_execute = engine.execute

    def execute(*args, **kwargs):
        state["armed"] = True
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(local, "_put", put)
    monkeypatch.setattr(engine, "execute", execute)
    code, _, err = run_cli(capsys, "generate", reference, "-o", store, *SEEDED, "--tile", 24, "--scheduler", "sync")
    one_line(code, err, "is full", f"gigasid resume {store}")
    code, _, err = run_cli(capsys, "resume", store)  # still full: the same advice, nothing lost
    one_line(code, err, "is full", f"gigasid resume {store}")
    monkeypatch.undo()
    assert not list(store.rglob("*.partial")) and not (store / ".lock").exists()
    code, _, err = run_cli(capsys, "resume", store)
    assert code == 0, err
    assert np.array_equal(output(store), output(finished))


def _shim_writer(monkeypatch, fmt: str) -> None:
    if fmt == "ome.tif":
        import tifffile

        monkeypatch.setattr(tifffile.TiffWriter, "write", _enospc)
    elif fmt == "dzi":
        real = Path.write_bytes
        monkeypatch.setattr(Path, "write_bytes", lambda self, data: _enospc() if "_files" in str(self) else real(self, data))
    elif fmt == "ome.zarr":
        _fail_after(monkeypatch, 2)
    else:
        def write_to_file(self, *_args, **_kwargs):
            raise pyvips.Error("unable to write", "VipsForeignSave: write failed: No space left on device")

        monkeypatch.setattr(pyvips.Image, "write_to_file", write_to_file)


@pytest.mark.parametrize("fmt", ["ome.tif", "dzi", "ome.zarr", "png", "jpg"])
def test_a_full_disk_during_an_export_keeps_the_previous_export(finished, tmp_path, monkeypatch, capsys, fmt) -> None:
    out = tmp_path / f"out.{fmt}"
    code, _, err = run_cli(capsys, "export", finished, out)
    assert code == 0, err
    before = snapshot(tmp_path)
    _shim_writer(monkeypatch, fmt)
    code, _, err = run_cli(capsys, "export", finished, out)
    one_line(code, err, "is full")
    monkeypatch.undo()
    assert snapshot(tmp_path) == before  # the previous export whole, no temporary left


def test_a_full_disk_writing_an_image_output(tmp_path, reference, monkeypatch, capsys) -> None:
    def write_to_file(self, *_args, **_kwargs):
        raise pyvips.Error("unable to write", "VipsForeignSave: No space left on device")

    monkeypatch.setattr(pyvips.Image, "write_to_file", write_to_file)
    code, _, err = run_cli(capsys, "generate", reference, "-o", tmp_path / "out.png", *SMOKE)
    one_line(code, err, "is full")
    assert not (tmp_path / "out.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


# --- 8. a read-only store ----------------------------------------------------------------------


def _read_only(monkeypatch, folder: Path) -> None:
    """Writes under ``folder`` fail as on a read-only mount (as root a chmod stops nothing)."""
    locked = str(folder.resolve())
    real_open, real_access = os.open, os.access

    def opener(path, flags, *args, **kwargs):
        if str(Path(path).resolve()).startswith(locked) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    def access(path, mode, *args, **kwargs):
        if str(Path(path).resolve()).startswith(locked) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", opener)
    monkeypatch.setattr(os, "access", access)


def test_resume_of_a_read_only_finished_store_reports_it_finished(finished, copy, monkeypatch, capsys, tmp_path) -> None:
    store = copy(finished)
    before = snapshot(store)
    _read_only(monkeypatch, store)
    code, out, err = run_cli(capsys, "resume", store)
    assert code == 0 and "complete" in out, err
    code, out, err = run_cli(capsys, "check", store)
    assert code == 0 and "no damage" in out, err
    code, _, err = run_cli(capsys, "export", store, tmp_path / "ro.png")  # its pyramid is built: reading only
    assert code == 0, err
    monkeypatch.undo()
    assert snapshot(store) == before


def test_resume_of_a_read_only_unfinished_store_is_one_line(stopped, copy, monkeypatch, capsys) -> None:
    store = copy(stopped)
    before = snapshot(store)
    _read_only(monkeypatch, store)
    code, _, err = run_cli(capsys, "resume", store)
    one_line(code, err, "not writable", str(store))
    monkeypatch.undo()
    assert snapshot(store) == before


# --- 9. the viewer -----------------------------------------------------------------------------


def test_the_viewer_answers_404_for_huge_numbers(finished) -> None:
    from gigasid.io.viewer import make_server, open_source

    server = make_server(open_source(finished, log=lambda message: None), 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for url in ["/image_files/" + "9" * 5000 + "/0_0.jpeg", "/image_files/6/" + "1" * 5000 + "_0.jpeg",
                    "/image_files/6/0_" + "7" * 20 + ".jpeg", "/image_files/4294967296/0_0.jpeg"]:
            with pytest.raises(urllib.error.HTTPError) as answer:
                urllib.request.urlopen(base + url, timeout=10)
            assert answer.value.code == 404
        with urllib.request.urlopen(base + "/image_files/6/0_0.jpeg", timeout=10) as ok:
            assert ok.status == 200  # the server still serves
    finally:
        server.shutdown()
        server.server_close()


def test_a_chunk_damaged_while_the_viewer_serves_is_an_error_answer(finished, copy, capsys) -> None:
    from gigasid.io.viewer import make_server, open_source

    store = copy(finished)
    server = make_server(open_source(store, log=lambda message: None), 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    damage(store / "output/c/0/0/0", "bitflip")
    try:
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/image_files/6/0_0.jpeg", timeout=10)
        assert answer.value.code == 500
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "output/c/0/0/0 (checksum mismatch)" in err and "gigasid resume" in err


# --- 10, 11. limits decided before computing --------------------------------------------------


@pytest.fixture(scope="module")
def bomb(workdir) -> Path:
    """A valid, small PNG declaring 16 000 x 16 000 grey pixels."""
    path = workdir / "bomb.png"
    pyvips.Image.black(16000, 16000).write_to_file(str(path), compression=9)
    assert path.stat().st_size < 2**20
    return path


@pytest.mark.parametrize("output_name", ["out.png", "job.zarr"])
def test_a_reference_too_large_for_memory_is_refused_from_its_header(bomb, tmp_path, monkeypatch, capsys, output_name) -> None:
    from gigasid import limits

    monkeypatch.setattr(limits, "available_memory", lambda: 8 * 2**30)
    started = time.monotonic()
    code, _, err = run_cli(capsys, "generate", bomb, "-o", tmp_path / output_name, *SMOKE, "--size", "64x64")
    one_line(code, err, "bomb.png", "16000x16000", "GiB", "downscaled")
    assert time.monotonic() - started < 10
    assert not list(tmp_path.iterdir())


def test_a_decompression_bomb_hits_the_pixel_limit(bomb, tmp_path, monkeypatch, capsys) -> None:
    from gigasid import limits

    monkeypatch.setattr(limits, "MAX_REFERENCE_PIXELS", 10_000_000)
    code, _, err = run_cli(capsys, "generate", bomb, "-o", tmp_path / "out.png", *SMOKE)
    one_line(code, err, "megapixels", "limit")


def test_the_in_memory_path_points_to_a_job_store(tmp_path, reference, monkeypatch, capsys) -> None:
    from gigasid import limits
    from gigasid.config import load_pipeline as load

    config = load("smoke", SETTINGS)
    needed = limits.working_set((48, 64, 3), None, config)
    monkeypatch.setattr(limits, "available_memory", lambda: needed + 1)  # the index fits, the output not
    code, _, err = run_cli(capsys, "generate", reference, "-o", tmp_path / "out.png", *SMOKE, "--size", "2000x2000")
    one_line(code, err, "-o JOB.zarr", "streams")


@pytest.mark.parametrize(
    ("output_name", "size", "needles"),
    [("huge.png", "100000x100000", ["written from memory", "-o JOB.zarr"]),
     ("wide.jpg", "16x66000", ["65500", "JPEG"]),
     ("huge.zarr", "100000x100000", ["GiB", "free", "--force"])],
)
def test_output_limits_are_checked_before_computing(tmp_path, reference, capsys, monkeypatch, output_name, size, needles) -> None:
    from gigasid.io import disk

    monkeypatch.setattr(disk, "free_bytes", lambda folder: 50 * 2**30)
    started = time.monotonic()
    code, _, err = run_cli(capsys, "generate", reference, "-o", tmp_path / output_name, *SMOKE, "--size", size)
    one_line(code, err, *needles)
    assert time.monotonic() - started < 10
    assert not list(tmp_path.iterdir())


def test_force_starts_a_job_the_disk_estimate_refuses(tmp_path, reference, monkeypatch, capsys) -> None:
    from gigasid.io import disk

    monkeypatch.setattr(disk, "free_bytes", lambda folder: 1024)
    code, _, err = run_cli(capsys, "generate", reference, "-o", tmp_path / "j.zarr", *SMOKE, "--tile", 24)
    one_line(code, err, "--force")
    code, _, err = run_cli(capsys, "generate", reference, "-o", tmp_path / "j.zarr", *SMOKE, "--tile", 24, "--force")
    assert code == 0, err


def test_the_memory_of_a_jobs_tasks_is_checked_before_it_starts(tmp_path, reference, finished, monkeypatch, capsys) -> None:
    from gigasid import limits

    monkeypatch.setattr(limits, "available_memory", lambda: 20 * 2**20)  # the index fits, 2 tasks not
    store = tmp_path / "j.zarr"
    code, _, err = run_cli(capsys, "generate", reference, "-o", store, *SEEDED, "--tile", 24, "--scheduler", "threads")
    one_line(code, err, "task(s) at once", "GiB", "--tile", "--force")
    assert not list(tmp_path.iterdir())  # nothing created
    code, _, err = run_cli(capsys, "generate", reference, "-o", store, *SEEDED, "--tile", 24, "--force")
    assert code == 0, err
    assert np.array_equal(output(store), output(finished))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_killed_runs_are_removed(finished, tmp_path, reference, capsys) -> None:
    host = owner_tag().split("-")[0]
    dead = f"{host}-{_dead_pid()}"
    alive = owner_tag()  # this process: never touched
    stale = [tmp_path / f".gigasid-{dead}-abc123", tmp_path / f".out_files.0123456789ab.{dead}.tmp",
             tmp_path / f".out.dzi.0123456789ab.{dead}.tmp.dzi", tmp_path / f".img.png.0123456789ab.{dead}.tmp.png"]
    # what version 0.1 left (no owner in the name): stale once untouched for a day
    legacy = [tmp_path / ".out_files.0123456789ab.tmp", tmp_path / ".gigasid-k2j4_x9q"]
    kept = [tmp_path / f".gigasid-{alive}-def456", tmp_path / ".out_files.0123456789ac.tmp", tmp_path / ".mine"]
    for path in stale + legacy + kept:
        if path.name.endswith(("tmp.dzi", ".png")) or path.name == ".mine":
            path.write_bytes(b"x")
        else:
            (path / "1").mkdir(parents=True)
    for path in legacy:
        os.utime(path, (time.time() - 2 * 86400,) * 2)
    stale += legacy
    code, _, err = run_cli(capsys, "export", finished, tmp_path / "out.dzi")
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", reference, "-o", tmp_path / "img.png", *SMOKE, "--tile", 24)
    assert code == 0, err
    assert [p for p in stale if os.path.lexists(p)] == []
    assert all(os.path.lexists(p) for p in kept)


# --- smaller ones ------------------------------------------------------------------------------


def test_a_float_reference_in_0_255_is_refused_not_whitened(tmp_path, capsys) -> None:
    values = (np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.float32)
    pyvips.Image.new_from_array(values).write_to_file(str(tmp_path / "float.tif"))
    code, _, err = run_cli(capsys, "generate", tmp_path / "float.tif", "-o", tmp_path / "out.png", *SMOKE)
    one_line(code, err, "float.tif", "254.", "[0, 1]")
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(("seed", "samples"), [(-1, 1), (2**63, 1), (2**64 - 1, 1), (2**63 - 1, 2)])
def test_seeds_outside_the_range_are_refused(tmp_path, reference, capsys, seed, samples) -> None:
    code, _, err = run_cli(capsys, "generate", reference, "-o", tmp_path / "out.png", *SMOKE, "--seed", seed,
                           "--samples", samples)
    one_line(code, err, "--seed", str(seed))


def test_interrupted_starts_a_new_line(tmp_path, reference, monkeypatch, capsys) -> None:
    def interrupted(*_args, **_kwargs):
        sys.stderr.write("  scale 0 step 1/3: 1/6 tiles, 3.0 tiles/s   \r")
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "execute", interrupted)
    code, _, err = run_cli(capsys, "generate", reference, "-o", tmp_path / "j.zarr", *SMOKE, "--tile", 24)
    assert code == 130
    assert "\r\ngigasid: interrupted" in err


def test_an_existing_folder_that_is_not_a_store_gets_no_resume_hint(tmp_path, reference, finished, capsys) -> None:
    (tmp_path / "mine.zarr").mkdir()
    code, _, err = run_cli(capsys, "generate", reference, "-o", tmp_path / "mine.zarr", *SMOKE)
    line = one_line(code, err, "not a gigasid job store")
    assert "resume" not in line
    code, _, err = run_cli(capsys, "generate", reference, "-o", finished, *SMOKE)
    one_line(code, err, "already exists", "gigasid resume")
