"""The command line: ``gigasid generate | resume | check | info | export | view``. Thin: parse,
read, call ``jobs``, ``graph.engine``, ``io.exporters`` or ``io.viewer``, write, report.

User mistakes (:class:`~gigasid.errors.GigasidError`) and a full disk become one line on stderr
and exit code 2; anything else is a bug and keeps its traceback. What can be decided before
computing is: an output that would overwrite an input or another output, the input's working set
against the memory available (``gigasid.limits``), an image format's size limits, and
a job store's size against the free disk (``--force`` overrides that one).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from gigasid import limits
from gigasid.errors import GigasidError, InputError

_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_size(text: str) -> tuple[int, int]:
    """``"HxW"`` → (H, W), both positive."""
    match = _SIZE.match(text)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise InputError(f"--size must be HEIGHTxWIDTH in pixels, e.g. 256x512; got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _parser() -> argparse.ArgumentParser:
    from importlib.resources import files

    from gigasid.config import PIPELINES_DIR, preset_names

    # the presets and profiles shipped in the package (gigasid/pipelines, gigasid/schedulers)
    pipelines = ", ".join(preset_names(PIPELINES_DIR))
    schedulers = ", ".join(preset_names(files("gigasid") / "schedulers"))
    parser = argparse.ArgumentParser(prog="gigasid", description="Training-free single-image diffusion.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate new images from one reference image")
    gen.add_argument("input", type=Path, help="reference image (PNG, JPEG, TIFF) or a folder of them")
    gen.add_argument("-o", "--output", type=Path, required=True, help="output image, or a folder for a folder input")
    gen.add_argument("--pipeline", default="uncond", help=f"preset name ({pipelines}) or a YAML file")
    gen.add_argument("--size", help="output size HEIGHTxWIDTH (default: the preset's output_scale × input)")
    gen.add_argument("--structure", type=Path, metavar="CONTENT",
                     help="--pipeline analogy: the image whose layout the output takes, drawn with INPUT's "
                     "patches (default size: its own, scaled by output_scale; another aspect ratio is refused)")
    gen.add_argument("--ref", type=Path, action="append", default=[], metavar="IMAGE",
                     help="another reference image (repeatable): one patch set per scale drawn from INPUT and "
                     "every --ref (the output's default size is INPUT's)")
    gen.add_argument("--mask", type=Path, metavar="MASK",
                     help="--pipeline inpaint: an image of the input's size, white where it is regenerated")
    gen.add_argument("--place", help="--pipeline outpaint: where the input sits on the --size canvas: center "
                     "(default), left, right, top, bottom or X,Y (its top-left pixel); --set place=...")
    gen.add_argument("--prompt", metavar="TEXT", help="--pipeline text-style: the text the input is restyled "
                     "toward, e.g. \"Van Gogh style\" (CLIP weights from clip.path; nothing is downloaded)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the first sample, 0 <= N < 2^63")
    gen.add_argument("--samples", type=int, default=1, help="samples per input (seeds seed, seed+1, ...)")
    gen.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a preset setting, e.g. --set index.k=10 --set eta=1")
    gen.add_argument("--device", choices=("cpu", "cuda", "auto"),
                     help="where the denoisers run (the same as --set device=...; auto: cuda where torch sees one)")
    gen.add_argument("--tile", type=int, help="run out of core through the tiled engine with this tile size "
                     "(px; latent cells of 8 px in a latent job; default 1024 px or 512 cells)")
    gen.add_argument("--scheduler", default="threads", help=f"execution profile ({schedulers}) or a YAML file")
    gen.add_argument("--export", action="append", default=[], type=Path, metavar="OUT",
                     help="after a .zarr job finishes, export it to OUT (as `gigasid export`, default options); repeatable")
    gen.add_argument("--force", action="store_true",
                     help="start even when the plan's disk or memory estimate exceeds what is free")
    res = commands.add_parser("resume", help="continue a stopped out-of-core job from its store")
    res.add_argument("store", type=Path)
    res.add_argument("--scheduler", default="threads", help=f"execution profile ({schedulers}) or a YAML file")
    res.add_argument("--export", action="append", default=[], type=Path, metavar="OUT",
                     help="when the job is complete, export it to OUT (as `gigasid export`); repeatable")
    inf = commands.add_parser("info", help="show a job store's config, status and per-scale timings")
    inf.add_argument("store", type=Path)
    chk = commands.add_parser(
        "check", help="read every chunk a job store's done-grids claim and list the damaged ones",
        description="Exit 0 when nothing is damaged; else the damaged chunks are listed and the exit "
        "code is 2. `gigasid resume` runs this first and recomputes what is damaged.",
    )
    chk.add_argument("store", type=Path)
    exp = commands.add_parser(
        "export", help="write a finished job store as pyramidal TIFF, DeepZoom, OME-Zarr, PNG or JPEG",
        description="The format comes from OUTPUT's name: .tif/.ome.tif (pyramidal tiled OME BigTIFF), .dzi "
        "(DeepZoom), .ome.zarr (OME-Zarr NGFF 0.5), .png/.jpg (the whole image, or a --preview).",
    )
    exp.add_argument("store", type=Path, help="a finished job store (OUT.zarr)")
    exp.add_argument("output", type=Path, help="OUT.tif, OUT.ome.tif, OUT.dzi, OUT.ome.zarr, OUT.png or OUT.jpg")
    exp.add_argument("--tile", type=int, help="tile (TIFF, DeepZoom) or chunk (OME-Zarr) side in pixels (default 256)")
    exp.add_argument("--compression", help="TIFF: jpeg (default), zstd, deflate, none; DeepZoom tiles: jpeg (default), "
                     "png; OME-Zarr: zstd (default), deflate, none")
    exp.add_argument("--quality", type=int, help="JPEG quality 1-100 (default 90)")
    exp.add_argument("--overlap", type=int, help="DeepZoom: pixels a tile shares with each neighbour (default 1)")
    exp.add_argument("--preview", type=int, metavar="N", help="PNG/JPEG: a downscaled copy whose long side is N pixels")
    view = commands.add_parser("view", help="pan and zoom a .dzi export or a job store in a browser (local page)")
    view.add_argument("path", type=Path, help="a .dzi export or a finished job store")
    view.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: any free port)")
    view.add_argument("--open", action="store_true", help="also open the page in the default browser")
    return parser


def _outputs_for(inputs: list[Path], output: Path, samples: int, folder_input: bool) -> list[list[Path]]:
    """The output files of each input, refused before anything is computed when one would
    overwrite an input or two would be the same file. In a folder, images sharing a name stem
    (``x.png``, ``x.jpg``) keep their format in the output's name: ``x_png.png``, ``x_jpg.png``."""
    from collections import Counter

    from gigasid.io.images import WRITE_SUFFIXES, check_writable_output

    if folder_input:
        if output.suffix.lower() in WRITE_SUFFIXES:
            raise InputError(f"input is a folder, so -o must be a folder too, got {output}")
        stems = Counter(path.stem.lower() for path in inputs)
        names = [path.stem if stems[path.stem.lower()] == 1 else f"{path.stem}_{path.suffix[1:].lower()}" for path in inputs]
        bases = [output / f"{name}.png" for name in names]
    else:
        bases = [output]
    planned = []
    for base in bases:
        if samples == 1:
            planned.append([base])
        else:
            planned.append([base.with_name(f"{base.stem}_{i}{base.suffix}") for i in range(samples)])
    _refuse_overwrites(inputs, [path for outputs in planned for path in outputs])
    if folder_input:
        output.mkdir(parents=True, exist_ok=True)
    for outputs in planned:
        check_writable_output(outputs[0])
    return planned


def _same_file(a: Path, b: Path) -> bool:
    """Do two paths name one file (symlinks, ``..``, hard links, a case-insensitive disk)?"""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _refuse_overwrites(inputs: list[Path], outputs: list[Path]) -> None:
    for out in outputs:
        for source in inputs:
            if _same_file(out, source):
                raise InputError(
                    f"output {out} is the input {source}: writing it would destroy the reference; "
                    "choose another output name or folder"
                )
    seen: dict[str, Path] = {}
    for out in outputs:
        key = os.path.normcase(os.path.realpath(out)).lower()
        if key in seen:
            raise InputError(
                f"two outputs would both be written to {out}; rename one of the inputs or write them "
                "one at a time"
            )
        seen[key] = out


# seeds are 64-bit signed in the noise generator's key: refuse what would wrap rather than alias
MAX_SEED = 2**63
# outputs above this many pixels run through the tiled engine even without --tile
TILED_ABOVE_PIXELS = 16_000_000
DEFAULT_TILE = 1024
# latent jobs tile in latent cells (8 px each): 512 cells = 4096 px, so a 8192² output still has
# several tiles per stage to spread over the workers
DEFAULT_LATENT_TILE = 512


def default_tile(config) -> int:
    return DEFAULT_TILE if config.latent.codec == "pixel" else DEFAULT_LATENT_TILE


def generate_command(args: argparse.Namespace) -> None:
    from gigasid.config import load_pipeline
    from gigasid.io.images import list_images, read_image, write_image

    if args.samples < 1:
        raise InputError(f"--samples must be >= 1, got {args.samples}")
    if not (0 <= args.seed and args.seed + args.samples - 1 < MAX_SEED):
        raise InputError(
            f"--seed must be between 0 and 2^63 - 1 (with --samples {args.samples}: at most "
            f"{MAX_SEED - args.samples}), got {args.seed}"
        )
    if args.tile is not None and args.tile < 1:
        raise InputError(f"--tile must be a positive number of pixels, got {args.tile}")
    size = parse_size(args.size) if args.size else None
    sugar = ([f"device={args.device}"] if args.device else []) + ([f"place={args.place}"] if args.place else [])
    config = load_pipeline(args.pipeline, args.overrides + sugar,
                           None if args.prompt is None else {"clip": {"prompt": args.prompt}})
    from gigasid.core.device import resolve_device

    resolve_device(config.device)  # cuda on a machine without one: refused before any work
    structure_shape = _check_structure(args, config)
    args.hole = _read_mask(args, config)
    references = _read_references(args, config)
    if args.export and args.output.suffix != ".zarr":
        raise InputError(
            f"--export exports a job store: write the job to one (-o JOB.zarr --export {args.export[0]}), "
            "or export an existing store with `gigasid export`"
        )
    if args.output.suffix == ".zarr":
        if args.input.is_dir() or args.samples != 1:
            raise InputError("a .zarr output holds one job: give one input image and --samples 1")
        from gigasid.io.exporters import check_export, exporter_for

        for path in args.export:  # a bad export path fails now, not after the job
            check_export(path)
            _refuse_overwrites([args.input, *_structure(args), *_mask(args)], exporter_for(path).outputs(path))
        _refuse_overwrites([args.input, *_structure(args), *_mask(args)], [args.output])
        _refuse_overwrites(args.ref, [args.output])
        _generate_store(args, config, size, references)
        for path in args.export:
            _export(args.output, path)
        return
    folder_input = args.input.is_dir()
    inputs = list_images(args.input) if folder_input else [args.input]
    if folder_input and args.structure is not None:
        raise InputError("--structure takes one input image (the style), not a folder")
    planned = _outputs_for(inputs, args.output, args.samples, folder_input)
    _refuse_overwrites(_structure(args), [path for outputs in planned for path in outputs])
    _refuse_overwrites(_mask(args), [path for outputs in planned for path in outputs])
    _refuse_overwrites(args.ref, [path for outputs in planned for path in outputs])
    if folder_input and args.mask is not None:
        raise InputError("--mask belongs to one input image (it must have its size), not to a folder")

    from gigasid import jobs
    from gigasid import plan as job_plan
    from gigasid.io.images import image_shape

    sizes = []
    for path, outputs in zip(inputs, planned):  # every limit checked before the first image is computed
        height, width, channels = image_shape(path)
        reference_shape = (height, width, channels)
        if references is not None:  # the canvas of every reference is what is held and indexed
            reference_shape = (*references[0].shape[1:], channels)
        if structure_shape is not None:  # an analogy: the structure's size, its aspect kept
            out_size = jobs.structure_size(structure_shape, size, config)
        else:
            out_size = size or jobs.default_size(height, width, config)
        if job_plan.known_kind(config) is not None:  # outpaint's canvas, inpaint's reference size
            out_size = job_plan.known_size(config, (height, width), size)
        tiled = args.tile is not None or out_size[0] * out_size[1] > TILED_ABOVE_PIXELS
        limits.check_in_memory(path, reference_shape, out_size, config, tiled=tiled, force=args.force)
        for out_path in outputs:
            limits.check_image_output(out_path, out_size, channels)
        sizes.append((out_size, tiled))

    import torch

    def model_space(path):
        return torch.from_numpy(read_image(path)).permute(2, 0, 1).contiguous() * 2.0 - 1.0

    structure = None if args.structure is None else model_space(args.structure)
    for path, outputs, (out_size, tiled) in zip(inputs, planned, sizes):
        image, excluded = (model_space(path), None) if references is None else references
        if tiled:
            for offset, out_path in enumerate(outputs):
                _tiled_to_image(args, config, out_size, image, args.seed + offset, out_path, path, structure, excluded)
            continue
        job = jobs.prepare(image, config, size=out_size if references is not None else size, structure=structure,
                           mask=args.hole, excluded=excluded)
        for offset, out_path in enumerate(outputs):
            started = time.perf_counter()
            result = jobs.run(job, seed=args.seed + offset)
            total = time.perf_counter() - started
            write_image(out_path, jobs.to_pixels(result.image).transpose(1, 2, 0))
            _print_table(path, out_path, job, result, total, args.seed + offset)


def _read_references(args, config):
    """--ref: INPUT and every --ref on one canvas (``plan.reference_atlas``) as (canvas, the
    pixels that are no reference), or None without --ref."""
    if not args.ref:
        return None
    if args.input.is_dir():
        raise InputError("--ref adds references to one input image, not to a folder")
    from gigasid import plan as job_plan

    if args.structure is not None or job_plan.known_kind(config) is not None or job_plan.application(config).structure:
        raise InputError(
            f"--ref gives several references to draw from; the {config.application} application takes one "
            "(use uncond, retarget, tileable or a large preset)"
        )
    import torch

    from gigasid.io.images import read_image
    from gigasid.plan import reference_atlas

    images = []
    for path in [args.input, *args.ref]:
        try:
            pixels = read_image(path)
        except InputError as error:
            if path == args.input:
                raise
            raise InputError(f"--ref {path}: {error}") from None
        images.append(torch.from_numpy(pixels).permute(2, 0, 1).contiguous() * 2.0 - 1.0)
    return reference_atlas(images, config)


def _mask(args) -> list[Path]:
    return [] if args.mask is None else [args.mask]


def _read_mask(args, config):
    """inpaint's mask as bool (H, W), True where it is white (grey >= 0.5: regenerate); refused
    when the application takes none, or when it is not an image."""
    from gigasid.plan import check_mask_given

    check_mask_given(config, args.mask is not None)
    if args.mask is None:
        return None
    from gigasid.io.images import read_image

    try:
        pixels = read_image(args.mask)
    except InputError as error:
        raise InputError(f"--mask {args.mask}: {error}") from None
    return pixels.mean(axis=2) >= 0.5


def _structure(args) -> list[Path]:
    return [] if args.structure is None else [args.structure]


def _check_structure(args, config) -> tuple[int, int] | None:
    """The structure image's (H, W) when the application takes one (refused when it does not, or
    when one is missing or unreadable)."""
    from gigasid.plan import check_structure

    check_structure(config, args.structure is not None)
    if args.structure is None:
        return None
    from gigasid.io.images import image_shape

    try:
        return image_shape(args.structure)[:2]
    except InputError as error:
        message = str(error)
        raise InputError(
            message.replace("input image", "structure image", 1) if message.startswith("input image")
            else f"structure image: {message}"
        ) from None


def _run_store(store, scheduler: str, *, resumable: bool = True) -> None:
    """Run a created job to the end; ``resumable`` False for the scratch store of an image output
    (deleted on failure, so a full disk's message offers no ``resume``)."""
    from gigasid.graph import engine
    from gigasid.graph.profiles import load_profile
    from gigasid.io.disk import disk_full, is_disk_full

    profile = load_profile(scheduler)
    print(engine.plan_text(store))
    started = time.perf_counter()
    try:
        engine.execute(store, profile)
    except Exception as error:
        if is_disk_full(error):  # what is done is durable: the job continues where it stopped
            advice = (f"the store {store.path} keeps what is done: free some space, then `gigasid resume "
                      f"{store.path}` continues it") if resumable else None
            raise disk_full(store.path.parent, advice) from None
        raise
    finally:
        store.release_lock()
    print(f"done in {time.perf_counter() - started:.1f} s ({profile.kind})")


def _generate_store(args, config, size, references=None) -> None:
    """-o OUT.zarr: a resumable out-of-core job; the reference is read in strips (several
    references: their canvas, in memory)."""
    from gigasid.graph import engine
    from gigasid.graph.profiles import load_profile
    from gigasid.io.images import image_shape
    from gigasid.plan import default_size

    profile = load_profile(args.scheduler)  # a bad profile fails before any work
    image, excluded, shape = args.input, None, image_shape(args.input)
    if references is not None:
        image, excluded = references
        size = size or default_size(*shape[:2], config)  # INPUT's, not the canvas's
        shape = (*image.shape[1:], shape[2])
    limits.check_job_store(args.input, shape, config, force=args.force)
    store = engine.create_job(
        args.output, image, config, size=size, seed=args.seed, tile=args.tile or default_tile(config),
        source=str(args.input), force=args.force, profile=profile, structure=args.structure, mask=args.hole,
        excluded=excluded,
    )
    print(f"{args.input} -> {args.output} (pipeline: {config.application}, seed {args.seed})")
    _run_store(store, args.scheduler)


def _tiled_to_image(args, config, size, image, seed, out_path, source, structure=None, excluded=None) -> None:
    """An image output through the tiled engine: a temporary store beside the output."""
    import tempfile

    from gigasid.graph import engine
    from gigasid.graph.profiles import load_profile
    from gigasid.io.disk import owner_tag, remove_stale
    from gigasid.io.images import write_image

    profile = load_profile(args.scheduler)
    parent = out_path.parent if str(out_path.parent) else Path(".")
    remove_stale(parent, ".gigasid-")  # scratch stores of killed runs
    with tempfile.TemporaryDirectory(dir=parent, prefix=f".gigasid-{owner_tag()}-") as scratch:
        store = engine.create_job(
            Path(scratch) / "job.zarr", image, config, size=size, seed=seed,
            tile=args.tile or default_tile(config), source=str(source), force=args.force, profile=profile,
            structure=structure, mask=args.hole, excluded=excluded,
        )
        print(f"{source} -> {out_path} (pipeline: {config.application}, seed {seed}, tiled)")
        _run_store(store, args.scheduler, resumable=False)
        write_image(out_path, engine.read_output(store).transpose(1, 2, 0))


def _export(store: Path, output: Path, options=None) -> None:
    from gigasid.io.exporters import ExportOptions, export

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    report = export(store, output, options or ExportOptions(), log=progress)
    first, last = report.resolutions[0], report.resolutions[-1]
    sizes = f"{first[0]}x{first[1]}" + (f" down to {last[0]}x{last[1]}" if len(report.resolutions) > 1 else "")
    built = f", output pyramid built in {report.pyramid_seconds:.1f} s" if report.pyramid_seconds > 0 else ""
    print(f"{store} -> {output}: {report.format}, {len(report.resolutions)} resolution(s) {sizes} "
          f"in {report.seconds:.1f} s{built}")


def export_command(args: argparse.Namespace) -> None:
    from gigasid.io.exporters import ExportOptions

    options = ExportOptions(
        tile=args.tile, quality=args.quality, compression=args.compression, overlap=args.overlap, preview=args.preview
    )
    _export(args.store, args.output, options)


def view_command(args: argparse.Namespace) -> None:
    from gigasid.io import viewer

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be between 0 and 65535 (0: any free port), got {args.port}")
    viewer.serve(args.path, args.port, open_browser=args.open, log=lambda message: print(message, flush=True))


def resume_command(args: argparse.Namespace) -> None:
    from gigasid.graph import engine
    from gigasid.graph.profiles import load_profile
    from gigasid.io.exporters import check_export

    profile = load_profile(args.scheduler)
    for path in args.export:
        check_export(path)
    started = time.perf_counter()
    engine.resume(args.store, profile, log=lambda message: print(message, file=sys.stderr, flush=True))
    print(f"{args.store}: complete ({time.perf_counter() - started:.1f} s)")
    for path in args.export:
        _export(args.store, path)


def check_command(args: argparse.Namespace) -> None:
    from gigasid.io.store import JobStore
    from gigasid.io.store_check import check_store

    report = check_store(JobStore.open(args.store))
    if report.ok:
        print(f"{args.store}: {report.checked} chunk(s) read, no damage")
        return
    print(f"{args.store}: {report.checked} chunk(s) read, {len(report.damaged)} damaged:")
    for line in report.damaged:
        print(f"  {line}")
    raise report.error()


def info_command(args: argparse.Namespace) -> None:
    from gigasid.io.store import JobStore

    manifest = JobStore.open(args.store).manifest
    config = manifest["config"]
    print(f"{args.store}: gigasid {manifest['version']}, status {manifest['status']}")
    print(f"  source {manifest.get('source') or '-'}, seed {manifest['seed']}, size {manifest['size'][0]}x{manifest['size'][1]}, "
          f"tile {manifest['tile']}, halo {manifest['halo']}")
    def setting(dotted: str):  # shown as stored, "?" where the config lacks it (another version's)
        value = config
        for part in dotted.split("."):
            value = value.get(part, "?") if isinstance(value, dict) else "?"
        return value

    print(f"  application {setting('application')}, backend {setting('denoiser.backend')}, "
          f"T={setting('num_steps')}, eta={setting('eta')}, P={setting('patch_size')}, rho={setting('rho')}")
    if setting("latent.codec") not in ("pixel", "?"):
        print(f"  latent space {setting('latent.codec')} ({manifest['channels']} channels, {manifest.get('factor')} px "
              f"per cell), decode {setting('latent.decode')}")
    for stage, seconds in manifest.get("setup_timings", {}).items():
        print(f"  setup {stage}: {seconds:.1f} s")
    timings = manifest.get("timings", {})
    compute = manifest.get("compute_seconds", {})
    for scale in reversed(range(len(manifest["output_shapes"]))):
        height, width = manifest["output_shapes"][scale]
        state = "done" if scale in manifest["scales_done"] else "pending"
        seconds = timings.get(str(scale))
        took = f", {seconds:.1f} s wall" if seconds is not None else ""
        if str(scale) in compute:
            took += f", {compute[str(scale)]:.1f} s computing in tasks"
        print(f"  scale {scale}: {height}x{width} {state}{took}")
    took = f", {timings['output']:.1f} s" if "output" in timings else ""
    print(f"  output: {'written' if manifest['output_done'] else 'pending'}{took}")
    pyramid = manifest.get("output_pyramid")
    if pyramid:  # built by the first export or `gigasid view`
        print(f"  output pyramid: {pyramid['levels_done']} of {len(pyramid['shapes'])} reduced levels built")


def _print_table(source, out_path, job, result, total, seed) -> None:
    backend = job.config.denoiser.backend
    if backend == "knn":
        backend = f"knn k={job.config.index.k} {job.config.index.kind}"
    print(f"{source} -> {out_path}  (pipeline: {job.config.application}, seed {seed})")
    print(f"  {'scale':>5}  {'reference':>11}  {'output':>11}  {'backend':<16} {'setup s':>8} {'sample s':>9}")
    by_scale = {t.scale: t for t in result.timings}
    for scale in reversed(range(len(job.output_shapes))):
        ref, out = job.reference_shapes[scale], job.output_shapes[scale]
        timing = by_scale[scale].seconds
        print(
            f"  {scale:>5}  {ref[0]:>5}x{ref[1]:<5}  {out[0]:>5}x{out[1]:<5}  {backend:<16} "
            f"{job.setup_seconds[scale]:>8.2f} {timing:>9.2f}"
        )
    print(f"  total sampling {total:.2f} s, setup {sum(job.setup_seconds):.2f} s")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            generate_command(args)
        elif args.command == "resume":
            resume_command(args)
        elif args.command == "info":
            info_command(args)
        elif args.command == "check":
            check_command(args)
        elif args.command == "export":
            export_command(args)
        elif args.command == "view":
            view_command(args)
    except GigasidError as error:
        print(f"{_line_break()}gigasid: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ngigasid: interrupted", file=sys.stderr)  # the progress line may still be open
        return 130
    except BrokenPipeError:  # `gigasid info STORE | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as error:
        from gigasid.io.disk import disk_full, is_disk_full

        if not is_disk_full(error):
            raise
        advice = None
        if args.command == "resume":  # what it had done is durable, as before it started
            advice = f"the store keeps what is done: free some space, then run `gigasid resume {args.store}` again"
        print(f"{_line_break()}gigasid: error: {disk_full(_written_folder(args), advice)}", file=sys.stderr)
        return 2
    return 0


def _line_break() -> str:
    """A newline when a progress line (written with a carriage return) is still open on stderr."""
    engine = sys.modules.get("gigasid.graph.engine")
    return "\n" if engine is not None and engine.Progress.line_open else ""


def _written_folder(args: argparse.Namespace) -> Path:
    """Where the command writes, for the message of a full disk."""
    target = getattr(args, "output", None) or getattr(args, "store", None) or Path(".")
    return target if target.suffix == ".zarr" else target.parent


def entry_point() -> None:
    """The ``gigasid`` command: :func:`main`, then an immediate exit. By the time main returns
    every file is written and closed and every executor shut down (``open_executor``), and the
    interpreter's own teardown of torch, numba and faiss would add ~0.5 s to every command
    (measured: ``import torch`` alone exits 0.5 s later than ``os._exit``)."""
    from gigasid.graph.profiles import keep_freed_memory

    keep_freed_memory()  # this process is the command's: its allocator may keep what it frees
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry_point()
