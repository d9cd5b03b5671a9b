"""Nothing is lost (DESIGN.md §4.5, §5): a job killed with SIGKILL at any moment resumes to the
uninterrupted run's pixels, bit for bit; and every misuse of a job store is one clear line.

The kill trials run the real command line as a subprocess on a 96x128 crop of the rocket example
with the ``smoke`` preset (2 scales, P = 7, T = 3) plus eta = 0.5 (fresh noise at every step), tile
24 (24 + 6 tiles per stage). Each trial records where its kill landed; run with ``-s`` to see:

* a kill 0.5 s after the start lands before the store exists (the interpreter is still
  importing): there is nothing to resume, so the trial simply runs ``generate`` again;
* kills at seeded random delays after the store is fully created (stratified over the run's
  duration) land in some stage of some scale;
* one kill is injected *inside* a chunk write (a wrapper around zarr's LocalStore write kills the
  process after half a chunk went into its ``*.partial`` file), the case a timed kill almost never
  hits: the partial file must be there, and ``resume`` must remove it.

Before every resume a stale ``*.partial`` is also planted by hand in a chunk directory.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gigasid.cli import main
from gigasid.config import load_pipeline
from gigasid.graph import engine
from gigasid.io.store import JobStore

REPO = Path(__file__).resolve().parents[2]
ROCKET = REPO / "examples" / "rocket.png"
SMOKE = ["--pipeline", "smoke", "--set", "min_short_side=24", "--set", "eta=0.5"]
RUN = [*SMOKE, "--tile", "24"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def crop(workdir: Path) -> Path:
    path = workdir / "crop.png"
    Image.open(ROCKET).convert("RGB").crop((0, 0, 128, 96)).save(path)
    return path


@pytest.fixture(scope="module")
def small_crop(workdir: Path) -> Path:
    path = workdir / "small.png"
    Image.open(ROCKET).convert("RGB").crop((40, 40, 104, 88)).save(path)  # 48x64
    return path


@pytest.fixture(scope="module")
def baseline(workdir: Path, crop: Path) -> tuple[np.ndarray, float]:
    """The uninterrupted run's output (in process, same command line) and its duration."""
    started = time.perf_counter()
    assert main(["generate", str(crop), "-o", str(workdir / "baseline.zarr"), *RUN]) == 0
    seconds = time.perf_counter() - started
    torch.set_num_threads(1)
    return engine.read_output(JobStore.open(workdir / "baseline.zarr")), seconds


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gigasid.cli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def launch(*args: str | Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *map(str, args)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def created(store: Path) -> bool:
    """The store is complete as a job: its last array (``output_done``) exists."""
    return (store / "output_done" / "zarr.json").is_file()


def landing(store: Path) -> str:
    """Where a kill landed, read from what the store holds."""
    if not store.exists():
        return "before the store existed"
    if not created(store):
        return "while the store was being created"
    manifest = JobStore.open(store).manifest
    if manifest["status"] == "complete":
        return "after the job completed"
    group = JobStore.open(store)
    for scale in reversed(range(len(manifest["output_shapes"]))):
        if scale in manifest["scales_done"]:
            continue
        done = group.array(f"scales/{scale}/done")[...]
        for stage in range(done.shape[0]):
            count = int(done[stage].sum())
            if count < done[stage].size:
                name = "x_T" if stage == 0 else f"step {stage}"
                return f"scale {scale} {name}: {count}/{done[stage].size} tiles done"
        return f"scale {scale}: all stages done, not yet marked"
    done = group.array("output_done")[...]
    return f"output: {int(done.sum())}/{done.size} tiles written"


def plant_partial(store: Path) -> Path:
    """A leftover like the ones LocalStore's atomic write leaves when killed."""
    chunk_dir = store / "scales" / "0" / "x1" / "c" / "0" / "0"
    chunk_dir.mkdir(parents=True, exist_ok=True)
    leftover = chunk_dir / "1.0123456789abcdef0123456789abcdef.partial"
    leftover.write_bytes(b"\x28\xb5\x2f\xfd half a chunk")
    return leftover


def report(text: str) -> None:
    """Where a kill landed, shown with ``pytest -s`` (past capsys, which these tests use)."""
    print(text, file=sys.__stderr__, flush=True)


def info_works(store: Path, capsys) -> str:
    code = main(["info", str(store)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "status" in captured.out and "scale 0" in captured.out
    return captured.out


def resume_and_check(store: Path, expected: np.ndarray, capsys) -> None:
    info_works(store, capsys)
    leftover = plant_partial(store)
    result = cli("resume", store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not leftover.exists() and not list(store.rglob("*.partial"))
    assert not (store / ".lock").exists()
    final = JobStore.open(store)
    assert final.manifest["status"] == "complete"
    assert np.array_equal(engine.read_output(final), expected)


# --- 3. kill trials ---------------------------------------------------------------------------


def test_a_kill_before_the_store_exists_just_reruns(workdir, crop, baseline, capsys) -> None:
    store = workdir / "early.zarr"
    process = launch("-m", "gigasid.cli", "generate", crop, "-o", store, *RUN)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    where = landing(store)
    report(f"\nkill at 0.50 s after start: landed {where}")
    if not store.exists():  # nothing was started: simply run generate again (here in process)
        assert main(["generate", str(crop), "-o", str(store), *RUN]) == 0
        torch.set_num_threads(1)
        assert np.array_equal(engine.read_output(JobStore.open(store)), baseline[0])
    else:
        resume_and_check(store, baseline[0], capsys)


@pytest.mark.parametrize("trial", range(3))
def test_a_kill_at_a_random_moment_resumes_to_the_same_pixels(workdir, crop, baseline, capsys, trial) -> None:
    """Killed at a seeded random delay after the store is created (a kill during creation is
    test_a_kill_while_creating_the_store_...): trial k draws from the k-th third of
    [0.05 s, 0.9 x the uninterrupted run's time], so early, middle and late stages all get hit."""
    expected, seconds = baseline
    edges = np.linspace(0.05, 0.9 * seconds, 4)
    delay = random.Random(1000 + trial).uniform(edges[trial], edges[trial + 1])
    store = workdir / f"trial{trial}.zarr"
    process = launch("-m", "gigasid.cli", "generate", crop, "-o", store, *RUN)
    deadline = time.monotonic() + 120
    while not created(store) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    try:
        process.wait(timeout=delay)
        killed = False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed = True
    where = landing(store)
    report(
        f"\ntrial {trial}: kill {delay:.2f} s after creation (of a {seconds:.1f} s run): "
        f"{'landed ' + where if killed else 'the run had finished'}"
    )
    assert store.exists()
    resume_and_check(store, expected, capsys)


KILLER = '''
"""Run the gigasid command line, SIGKILLing this process in the middle of one chunk write."""
import os
import re
import signal
import sys
from pathlib import Path

import zarr.storage._local as local

TARGET = int(os.environ["KILL_AT_CHUNK_WRITE"])
real_put = local._put
seen = [0]


def put(path, value, exclusive=False):
    key = Path(path).as_posix()
    if re.search("/scales/0/(x0|x1|final)/c/", key):  # x_t and final chunks, not done-grids
        seen[0] += 1
        if seen[0] == TARGET:  # half the bytes into the .partial file, then die before the rename
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            data = bytes(value.as_buffer_like())
            with local._atomic_write(Path(path), "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
    return real_put(path, value, exclusive=exclusive)


local._put = put

if __name__ == "__main__":
    from gigasid.cli import main

    sys.exit(main(sys.argv[1:]))
'''


def test_a_kill_inside_a_chunk_write_leaves_no_torn_chunk(workdir, crop, baseline, capsys) -> None:
    script = workdir / "kill_in_write.py"
    script.write_text(KILLER)
    store = workdir / "in_write.zarr"
    target = 40  # scale 0 chunk writes: 24 of x_T, then step 1's ... : the 16th tile of step 1
    process = subprocess.Popen(
        [sys.executable, str(script), "generate", str(crop), "-o", str(store), *RUN],
        cwd=REPO,
        env={**os.environ, "KILL_AT_CHUNK_WRITE": str(target)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGKILL, err[-3000:]
    leftovers = list(store.rglob("*.partial"))
    report(
        f"\nkilled inside chunk write #{target} of scale 0: landed {landing(store)}; "
        f"left {[str(p.relative_to(store)) for p in leftovers]}"
    )
    # the planted half chunk (and possibly another thread's write in flight at that instant)
    assert leftovers and all("/scales/0/" in p.as_posix() for p in leftovers)
    resume_and_check(store, baseline[0], capsys)


def test_a_kill_while_creating_the_store_leaves_nothing_to_resume(workdir, crop, baseline) -> None:
    """Killed while the store is being created (under its temporary ``.NAME.creating`` name):
    the output path does not exist, and running generate again removes the leftover and gives
    the same pixels as an uninterrupted run."""
    store = workdir / "creating.zarr"
    building = workdir / ".creating.zarr.creating"
    process = launch("-m", "gigasid.cli", "generate", crop, "-o", store, *RUN)
    deadline = time.monotonic() + 120
    while not (building / ".lock").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait()
    report(f"\nkill as soon as the lock appeared: store exists {store.exists()}, leftover {building.exists()}")
    assert not store.exists()
    result = cli("generate", crop, "-o", store, *RUN)
    assert result.returncode == 0, result.stderr[-1500:]
    assert not building.exists()
    assert np.array_equal(engine.read_output(JobStore.open(store)), baseline[0])


# --- 5. clear errors ----------------------------------------------------------------------------


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("gigasid: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def small_store(tmp_path: Path, small_crop: Path) -> Path:
    """A created, not yet run, 48x64 smoke job (2 scales, 2x3 tiles of 24), unlocked."""
    from gigasid.io.images import read_image

    path = tmp_path / "small.zarr"
    config = load_pipeline("smoke", ["min_short_side=24", "eta=0.5"])
    image = torch.from_numpy(read_image(small_crop)).permute(2, 0, 1).contiguous() * 2.0 - 1.0
    store = engine.create_job(path, image, config, size=None, seed=0, tile=24)
    store.release_lock()
    return path


def test_a_tile_not_larger_than_the_halo(tmp_path, crop, capsys) -> None:
    store = tmp_path / "tiny-tile.zarr"
    code, _, err = run_cli(capsys, "generate", crop, "-o", store, *SMOKE, "--tile", 5)
    line = assert_user_error(code, err, "--tile 5", "halo")
    assert "--tile 20" in line  # the smallest that works: halo 19 for P = 7
    assert not store.exists()


def test_a_store_of_another_format(small_store, capsys) -> None:
    meta = json.loads((small_store / "zarr.json").read_text())
    meta["attributes"]["gigasid"]["format"] = 999
    (small_store / "zarr.json").write_text(json.dumps(meta))
    code, _, err = run_cli(capsys, "resume", small_store)
    assert_user_error(code, err, "format 999")
    code, _, err = run_cli(capsys, "info", small_store)
    assert_user_error(code, err, "format 999")


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(small_store, capsys) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (small_store / ".lock").write_text(f"{socket.gethostname()} {sleeper.pid}")
        code, _, err = run_cli(capsys, "resume", small_store)
        assert_user_error(code, err, "another gigasid process", str(sleeper.pid))
        assert JobStore.open(small_store).manifest["status"] == "created"  # nothing ran
    finally:
        sleeper.kill()
        sleeper.wait()
    # its writer is dead now: the lock is stale and resume takes it over
    assert (small_store / ".lock").read_text().endswith(str(sleeper.pid))
    code, _, err = run_cli(capsys, "resume", small_store)
    assert code == 0, err
    assert JobStore.open(small_store).manifest["status"] == "complete"
    assert not (small_store / ".lock").exists()


def test_resume_of_something_that_is_not_a_store(tmp_path, capsys) -> None:
    code, _, err = run_cli(capsys, "resume", tmp_path / "nowhere.zarr")
    assert_user_error(code, err, "nowhere.zarr", "not a gigasid job store")
    (tmp_path / "empty.zarr").mkdir()
    code, _, err = run_cli(capsys, "resume", tmp_path / "empty.zarr")
    assert_user_error(code, err, "empty.zarr", "not a gigasid job store")
    import zarr

    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w", zarr_format=3)
    code, _, err = run_cli(capsys, "resume", tmp_path / "plain.zarr")
    assert_user_error(code, err, "plain.zarr", "not a gigasid job store")
    code, _, err = run_cli(capsys, "info", tmp_path / "plain.zarr")
    assert_user_error(code, err, "not a gigasid job store")


def test_an_unknown_scheduler(tmp_path, crop, small_store, capsys) -> None:
    store = tmp_path / "never.zarr"
    code, _, err = run_cli(capsys, "generate", crop, "-o", store, *RUN, "--scheduler", "warp-drive")
    assert_user_error(code, err, "warp-drive", "threads")  # lists the available profiles
    assert not store.exists()
    code, _, err = run_cli(capsys, "resume", small_store, "--scheduler", "warp-drive")
    assert_user_error(code, err, "warp-drive")
    assert not (small_store / ".lock").exists()


def test_generate_into_an_existing_store(small_store, small_crop, capsys) -> None:
    code, _, err = run_cli(capsys, "generate", small_crop, "-o", small_store, *RUN)
    assert_user_error(code, err, str(small_store), "already exists", "resume")
    assert JobStore.open(small_store).manifest["status"] == "created"


def test_symmetric_into_a_store(tmp_path, small_crop, capsys) -> None:
    """The symmetric application runs tiled (a tile reads its mirror partner's box): the store's
    output mirrors exactly and equals the in-memory run's."""
    store, image = tmp_path / "mirror.zarr", tmp_path / "mirror.png"
    common = ["--pipeline", "symmetric", "--set", "min_short_side=24"]
    code, _, err = run_cli(capsys, "generate", small_crop, "-o", store, *common, "--tile", 28)
    assert code == 0, err
    code, _, err = run_cli(capsys, "generate", small_crop, "-o", image, *common)
    assert code == 0, err
    output = engine.read_output(JobStore.open(store))
    assert np.array_equal(output, output[:, :, ::-1])
    assert np.array_equal(output.transpose(1, 2, 0), np.asarray(Image.open(image)))
