"""Text-guided style (issue 14): the input inverted and sampled back with each clean estimate moved
along a CLIP similarity's gradient (``core.guidance``, ``guidance.clip``, ``plan.style_trip``, ``graph.engine.run_style``).

End to end on a tiny randomly initialised CLIP (two layers, 32-px views) saved with a hand-made
byte-level tokenizer, because no weights can be downloaded here or in CI: the prompt changes the
output and raises the output's similarity to it, a seed gives the same pixels, a store job equals
the in-memory one, and missing weights or bad inputs give one line. The update rule is checked
against a direct numpy computation on a score whose gradient is known.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gigasid import jobs
from gigasid.cli import main
from gigasid.config import load_pipeline
from gigasid.core.guidance import augmented_views, guided_estimate
from gigasid.errors import ConfigError, InputError, WeightsNotFoundError
from gigasid.graph import engine
from gigasid.graph.profiles import Profile
from gigasid.guidance.clip import load_clip
from gigasid.io.store import JobStore

REPO = Path(__file__).resolve().parents[1]
ROCKET = REPO / "examples" / "rocket.png"
# a short schedule: 40 steps, the inversion stops at step 12 (30 % noise)
SMALL = ["num_steps=40", "clip.views=4"]


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins of a byte-level BPE vocabulary, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A randomly initialised CLIP saved as a transformers folder, with a tokenizer that knows
    single bytes only (no merges): every prompt tokenizes, each to its own ids."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    symbols = _byte_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": 256 + index for index, symbol in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                              "model_max_length": 77}))
    config = CLIPConfig(
        text_config={"vocab_size": 514, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 512,
                     "eos_token_id": 513, "pad_token_id": 513},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


def rocket(box=(60, 40, 156, 112)) -> torch.Tensor:
    """A 72x96 crop of the rocket example in [-1, 1]."""
    pixels = np.asarray(Image.open(ROCKET).convert("RGB").crop(box), dtype=np.float32) / 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous() * 2.0 - 1.0


def style_config(clip: Path, prompt: str, *extra: str):
    return load_pipeline("text-style", [f"clip.path={clip}", *SMALL, *extra], {"clip": {"prompt": prompt}})


def similarity(clip: Path, prompt: str, image: torch.Tensor) -> float:
    scorer = load_clip(str(clip), prompt)
    views = augmented_views((image + 1) / 2, 8, scorer.side, torch.Generator().manual_seed(99))
    with torch.no_grad():
        return float(scorer.score(views))


# --- the update rule -------------------------------------------------------------------------


def test_guided_estimate_is_the_paper_update_on_a_known_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    x_hat = torch.rand(3, 6, 8, generator=generator) - 0.5
    previous = torch.rand(3, 6, 8, generator=generator) - 0.5
    weights = torch.randn(3, 6, 8, generator=generator)  # score = <weights, x>: its gradient is weights
    strength, momentum, fill = 0.3, 0.25, 0.4
    got = guided_estimate(x_hat, previous, lambda x: (weights * x).sum(), strength=strength,
                          momentum=momentum, fill=fill)
    # the same rule, written out in float64 numpy
    blended = momentum * x_hat.double().numpy() + (1 - momentum) * previous.double().numpy()
    w = weights.double().numpy()
    energy = np.sqrt((w**2).sum(axis=0))
    order = np.sort(energy.ravel())
    still = round((1 - fill) * energy.size)
    cut = order[still - 1]
    kept = energy > cut
    assert kept.sum() == energy.size - still
    shrunk = w * np.maximum(energy - cut, 0) / energy
    size = np.linalg.norm(blended * kept)
    length = np.linalg.norm(shrunk * kept)
    expected = np.clip(blended + strength * size / length * shrunk * kept, -1, 1)
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-6)
    # pixels below the cut do not move; without a previous estimate there is no momentum
    assert np.allclose(got.double().numpy()[:, ~kept], blended[:, ~kept], atol=1e-7)
    alone = guided_estimate(x_hat, None, lambda x: (weights * x).sum(), strength=0.0, momentum=momentum, fill=fill)
    assert torch.equal(alone, x_hat.clamp(-1, 1))


def test_a_flat_score_leaves_the_estimate() -> None:
    x_hat = torch.linspace(-2, 2, 48).reshape(3, 4, 4)
    got = guided_estimate(x_hat, None, lambda x: x.sum() * 0.0, strength=1.0, momentum=0.1, fill=0.5)
    assert torch.equal(got, x_hat.clamp(-1, 1))


def test_views_are_deterministic_differentiable_and_in_range() -> None:
    image = torch.rand(3, 40, 56, requires_grad=True)
    first = augmented_views(image, 6, 32, torch.Generator().manual_seed(5))
    again = augmented_views(image, 6, 32, torch.Generator().manual_seed(5))
    other = augmented_views(image, 6, 32, torch.Generator().manual_seed(6))
    assert first.shape == (6, 3, 32, 32)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert float(first.detach().min()) >= 0.0 and float(first.detach().max()) <= 1.0
    first.sum().backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="3, H, W"):
        augmented_views(torch.rand(1, 8, 8), 2, 8, torch.Generator())


# --- end to end ------------------------------------------------------------------------------


def test_the_prompt_changes_the_output_and_is_followed(tiny_clip) -> None:
    image = rocket()
    prompts = ("Van Gogh style", "a red brick wall")
    outputs = {p: jobs.generate(image, style_config(tiny_clip, p), seed=1) for p in prompts}
    assert outputs[prompts[0]].shape == image.shape
    assert not torch.equal(outputs[prompts[0]], outputs[prompts[1]])
    # deterministic for a seed
    assert torch.equal(outputs[prompts[0]], jobs.generate(image, style_config(tiny_clip, prompts[0]), seed=1))
    # guidance raises the similarity to its prompt over the same sampler without it
    plain = jobs.generate(image, style_config(tiny_clip, prompts[0], "clip.strength=0"), seed=1)
    for prompt in prompts:
        assert similarity(tiny_clip, prompt, outputs[prompt]) > similarity(tiny_clip, prompt, plain)
    # and without guidance the inversion and its way back keep the input's content
    assert float((plain - image).abs().mean()) < 0.15


def test_store_job_equals_the_in_memory_one(tiny_clip, tmp_path) -> None:
    image = rocket()
    config = style_config(tiny_clip, "Van Gogh style")
    expected = jobs.generate(image, config, seed=4)
    store_path = tmp_path / "style.zarr"
    store = engine.create_job(store_path, image, config, size=None, seed=4, tile=64)
    engine.execute(store, Profile(kind="sync"))
    assert np.array_equal(np.asarray(store.array("scales/0/final")[...]), expected.numpy())
    assert store.manifest["status"] == "complete"


def test_a_damaged_store_is_checked_and_rewritten_by_resume(tiny_clip, tmp_path, capsys) -> None:
    source = tmp_path / "in.png"
    Image.open(ROCKET).convert("RGB").crop((60, 40, 156, 112)).save(source)
    store = tmp_path / "job.zarr"
    args = ["--pipeline", "text-style", "--prompt", "Van Gogh style", "--set", f"clip.path={tiny_clip}",
            *[item for setting in SMALL for item in ("--set", setting)]]
    assert main(["generate", str(source), "-o", str(store), "--tile", "48", *args]) == 0
    expected = engine.read_output(JobStore.open(store))
    assert main(["generate", str(source), "-o", str(tmp_path / "same.png"), *args]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "same.png")), expected.transpose(1, 2, 0))
    key = store / "scales/0/final/c/0/0/0"
    data = bytearray(key.read_bytes())
    data[len(data) // 2] ^= 0x10
    key.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["check", str(store)]) == 2 and "scales/0/final" in capsys.readouterr().out
    assert main(["resume", str(store)]) == 0
    assert np.array_equal(engine.read_output(JobStore.open(store)), expected)
    assert main(["check", str(store)]) == 0
    # the Python API's prompt makes the same job
    from gigasid.api import create_job, open_output

    job = create_job(tmp_path / "api.zarr", source, pipeline="text-style", prompt="Van Gogh style", tile=48,
                     overrides=[f"clip.path={tiny_clip}", *SMALL]).submit("sync").wait()
    assert np.array_equal(np.asarray(open_output(job.path).compute()), expected)


def test_a_killed_job_resumes_to_the_same_pixels(tiny_clip, tmp_path) -> None:
    source = tmp_path / "in.png"
    Image.open(ROCKET).convert("RGB").crop((60, 40, 156, 112)).save(source)
    # the full 200-step schedule: 119 steps, each kept in the store
    args = ["--pipeline", "text-style", "--prompt", "Van Gogh style", "--set", f"clip.path={tiny_clip}",
            "--set", "clip.views=4", "--tile", "48", "--scheduler", "sync"]
    finished = tmp_path / "finished.zarr"
    assert main(["generate", str(source), "-o", str(finished), *args]) == 0
    expected = engine.read_output(JobStore.open(finished))
    killed = tmp_path / "killed.zarr"
    process = subprocess.Popen([sys.executable, "-m", "gigasid.cli", "generate", str(source), "-o", str(killed),
                                *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.monotonic() + 120
    kept = killed / "style" / "x" / "c" / "1" / "0" / "0" / "0"  # the first step's state
    while not kept.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.3)  # a few steps more
    process.send_signal(signal.SIGKILL)
    process.wait()
    manifest = JobStore.open(killed).manifest
    assert manifest["status"] != "complete", "the kill landed after the job"
    assert 0 < manifest.get("style_steps", 0) < 119
    done = subprocess.run([sys.executable, "-m", "gigasid.cli", "resume", str(killed)], capture_output=True,
                          text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(engine.read_output(JobStore.open(killed)), expected)


def test_missing_weights_say_where_they_were_looked_for(tmp_path, monkeypatch, capsys) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsNotFoundError) as error:
        load_clip("openai/clip-vit-base-patch32", "x")
    assert str(cache) in str(error.value) and "clip.path" in str(error.value)
    missing = tmp_path / "no-such-folder"
    source = tmp_path / "in.png"
    source.write_bytes(ROCKET.read_bytes())
    code = main(["generate", str(source), "-o", str(tmp_path / "out.png"), "--pipeline", "text-style",
                 "--prompt", "Van Gogh style", "--set", f"clip.path={missing}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(missing) in lines[0] and "clip.path" in lines[0]
    assert not (tmp_path / "out.png").exists()


def test_bad_inputs_are_refused(tiny_clip, tmp_path, capsys) -> None:
    with pytest.raises(ConfigError, match="needs a prompt"):
        load_pipeline("text-style", [f"clip.path={tiny_clip}"])
    with pytest.raises(ConfigError, match="num_scales=1"):
        style_config(tiny_clip, "x", "num_scales=2")
    with pytest.raises(ConfigError, match="pixel space"):
        style_config(tiny_clip, "x", "latent.codec=pca")
    with pytest.raises(ConfigError, match="application=style"):
        load_pipeline("uncond", [], {"clip": {"prompt": "Van Gogh style"}})
    with pytest.raises(InputError, match="its own size"):
        jobs.prepare(rocket(), style_config(tiny_clip, "x"), size=(80, 96))
    with pytest.raises(InputError, match="RGB"):
        jobs.generate(rocket()[:1], style_config(tiny_clip, "x"), seed=0)
    source = tmp_path / "in.png"
    source.write_bytes(ROCKET.read_bytes())
    code = main(["generate", str(source), "-o", str(tmp_path / "o.png"), "--pipeline", "uncond",
                 "--prompt", "Van Gogh style"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "application=style" in err, err
