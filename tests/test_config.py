"""Typed job configuration: every bad key or value raises ConfigError naming it; presets load."""

from __future__ import annotations

import dataclasses
import math

import pytest

from gigasid.config import (
    DenoiserConfig,
    IndexConfig,
    JobConfig,
    available_pipelines,
    from_mapping,
    load_pipeline,
    parse_overrides,
    to_mapping,
)
from gigasid.errors import ConfigError, GigasidError


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_defaults_are_the_papers() -> None:
    config = from_mapping(JobConfig, {})
    assert (config.num_steps, config.eta, config.patch_size, config.rho) == (10, 0.0, 15, 0.2)
    assert config.noise_schedule == "flow_linear" and config.application == "uncond"
    assert config.index.k == 5
    assert config == JobConfig()
    assert from_mapping(JobConfig, None) == JobConfig()


def test_unknown_top_level_key_is_named() -> None:
    with pytest.raises(ConfigError) as error:
        from_mapping(JobConfig, {"num_step": 3})
    message = _one_line(error)
    assert "num_step" in message and "num_steps" in message  # names the key and the valid ones


def test_unknown_nested_key_is_named_with_its_section() -> None:
    with pytest.raises(ConfigError) as error:
        from_mapping(JobConfig, {"index": {"kk": 10}})
    message = _one_line(error)
    assert "index.kk" in message and "index.k" in message
    with pytest.raises(ConfigError, match=r"denoiser\.dtype"):
        from_mapping(JobConfig, {"denoiser": {"dtype": "float32"}})
    with pytest.raises(ConfigError, match="index must be a mapping"):
        from_mapping(JobConfig, {"index": 3})


@pytest.mark.parametrize(
    "data,needles",
    [
        ({"eta": 2}, ["eta=2", "[0.0, 1.0]"]),
        ({"eta": -0.5}, ["eta=-0.5"]),
        ({"patch_size": 14}, ["patch_size=14", "odd"]),
        ({"patch_size": 0}, ["patch_size=0", "range"]),
        ({"num_steps": 0}, ["num_steps=0", "[1, 1000]"]),
        ({"num_steps": 1001}, ["num_steps=1001"]),
        ({"rho": 0}, ["rho=0"]),
        ({"index": {"k": 0}}, ["index.k=0"]),
        ({"index": {"nprobe": 0}}, ["index.nprobe=0"]),
        ({"num_scales": 0}, ["num_scales=0"]),
        ({"min_short_side": 10}, ["min_short_side=10", "patch_size=15"]),
        ({"output_scale": [1.0, 0.0]}, ["output_scale"]),
        ({"output_scale": [-1.0, 1.0]}, ["output_scale"]),
        ({"balance": {"strength": -1.0}}, ["balance.strength=-1.0"]),
        ({"balance": {"rounds": 0}}, ["balance.rounds=0"]),
        ({"balance": {"k": 0}}, ["balance.k=0"]),
        ({"balance": {"strength": 1.0}, "denoiser": {"backend": "exact"}}, ["balance.strength", "knn"]),
    ],
)
def test_out_of_range_values_raise(data, needles) -> None:
    with pytest.raises(ConfigError) as error:
        from_mapping(JobConfig, data)
    message = _one_line(error)
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize(
    "data,needles",
    [
        ({"eta": float("nan")}, ["eta"]),
        ({"rho": float("nan")}, ["rho"]),
        ({"output_scale": [1.0, math.inf]}, ["output_scale"]),
        ({"output_scale": [float("nan"), 1.0]}, ["output_scale"]),
    ],
    ids=["eta-nan", "rho-nan", "output_scale-inf", "output_scale-nan"],
)
def test_non_finite_values_raise(data, needles) -> None:
    """NaN compares False with both bounds, so a plain lo <= v <= hi check lets it through.

    eta=nan then fails deep inside the sampler (a traceback), rho=nan turns the whole output NaN,
    and output_scale=inf overflows in round() while sizing the output.
    """
    with pytest.raises(ConfigError) as error:
        from_mapping(JobConfig, data)
    message = _one_line(error)
    for needle in needles:
        assert needle in message


@pytest.mark.parametrize(
    "data,key",
    [
        ({"num_steps": "ten"}, "num_steps"),
        ({"num_steps": 2.5}, "num_steps"),
        ({"num_steps": True}, "num_steps"),
        ({"patch_size": [7]}, "patch_size"),
        ({"eta": "half"}, "eta"),
        ({"eta": [0.5]}, "eta"),
        ({"eta": False}, "eta"),
        ({"index": {"coherence": "maybe"}}, "index.coherence"),
        ({"index": {"k": "many"}}, "index.k"),
        ({"output_scale": [1.0]}, "output_scale"),
        ({"output_scale": "wide"}, "output_scale"),
    ],
)
def test_wrong_types_raise(data, key) -> None:
    with pytest.raises(ConfigError) as error:
        from_mapping(JobConfig, data)
    assert key in _one_line(error)


@pytest.mark.parametrize(
    "data,key,valid",
    [
        ({"application": "panorama"}, "application", "uncond, retarget, symmetric, tileable"),
        ({"noise_schedule": "cosine"}, "noise_schedule", "flow_linear, ve_edm"),
        ({"symmetry": "diagonal"}, "symmetry", "horizontal, vertical, both"),
        ({"denoiser": {"backend": "faiss"}}, "denoiser.backend", "exact, fused, knn"),
        ({"denoiser": {"compute_dtype": "float16"}}, "denoiser.compute_dtype", "float32, bfloat16, float64"),
        ({"index": {"kind": "hnsw"}}, "index.kind", "exact, flat, ivf, ivfpq"),
    ],
)
def test_unknown_literal_lists_the_valid_ones(data, key, valid) -> None:
    with pytest.raises(ConfigError) as error:
        from_mapping(JobConfig, data)
    message = _one_line(error)
    assert key in message and valid in message


def test_coercions_from_strings() -> None:
    # --set values arrive as YAML scalars; quoted numbers and HxW-style tuples are accepted
    config = from_mapping(
        JobConfig,
        {
            "patch_size": "7",
            "min_short_side": 7,
            "eta": "1",
            "rho": ".inf",
            "output_scale": "1x1.5",
            "index": {"k": "7"},
        },
    )
    assert config.patch_size == 7 and config.eta == 1.0 and math.isinf(config.rho)
    assert config.output_scale == (1.0, 1.5) and config.index.k == 7
    assert from_mapping(JobConfig, {"num_scales": None}).num_scales is None


def test_parse_overrides() -> None:
    assert parse_overrides(["index.k=10", "eta=1"]) == {"index": {"k": 10}, "eta": 1}
    assert parse_overrides(["rho=.inf", "application=tileable", "output_scale=[1, 2]", "num_scales="]) == {
        "rho": math.inf,
        "application": "tileable",
        "output_scale": [1, 2],
        "num_scales": None,
    }
    assert parse_overrides(["index.k=3", "index.kind=exact"]) == {"index": {"k": 3, "kind": "exact"}}
    config = from_mapping(JobConfig, parse_overrides(["index.k=10", "eta=1"]))
    assert config.index.k == 10 and config.eta == 1.0
    for bad in (["eta"], ["=1"], ["index..k=1"], ["eta=1", "eta.x=2"]):
        with pytest.raises(ConfigError):
            parse_overrides(bad)


@pytest.mark.parametrize("name", available_pipelines())
def test_every_preset_loads(name: str) -> None:
    # a text-style job is refused without its prompt (tests/test_text_style.py)
    config = load_pipeline(name, settings={"clip": {"prompt": "Van Gogh style"}} if name == "text-style" else None)
    assert isinstance(config, JobConfig)
    assert config.patch_size % 2 == 1
    assert config.min_short_side >= config.patch_size
    assert isinstance(to_mapping(config)["index"], dict)


def test_presets_present_and_meaningful() -> None:
    names = available_pipelines()
    for expected in ("uncond", "uncond-exact", "retarget", "symmetric", "tileable", "smoke"):
        assert expected in names
    assert load_pipeline("tileable").application == "tileable"
    assert load_pipeline("symmetric").application == "symmetric"
    assert load_pipeline("retarget").output_scale == (1.0, 1.5)
    exact = load_pipeline("uncond-exact")
    assert exact.denoiser == DenoiserConfig(backend="exact", compute_dtype="bfloat16")
    uncond = load_pipeline("uncond")
    assert (uncond.num_steps, uncond.eta, uncond.patch_size, uncond.rho) == (10, 0.0, 15, 0.2)
    assert uncond.index.kind == "ivf" and uncond.index.k == 5


def test_preset_with_overrides() -> None:
    config = load_pipeline("smoke", ["index.k=10", "eta=1", "index.kind=exact"])
    assert config.index.k == 10 and config.eta == 1.0 and config.index.kind == "exact"
    assert config.patch_size == 7  # the rest of the preset is kept
    assert config.index.search_dims == 16
    with pytest.raises(ConfigError, match="index.bogus"):
        load_pipeline("smoke", ["index.bogus=1"])


def test_unknown_preset_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError) as error:
        load_pipeline("nonesuch")
    message = _one_line(error)
    assert "nonesuch" in message
    for name in available_pipelines():
        assert name in message
    assert isinstance(error.value, GigasidError)


def test_pipeline_file_path(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("num_steps: 4\nindex:\n  k: 7\n")
    config = load_pipeline(str(path))
    assert config.num_steps == 4 and config.index.k == 7
    with pytest.raises(ConfigError, match="does not exist"):
        load_pipeline(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_pipeline(str(tmp_path / "list.yaml"))
    (tmp_path / "broken.yaml").write_text("num_steps: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline(str(tmp_path / "broken.yaml"))


def test_config_dataclasses_are_frozen() -> None:
    config = JobConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.eta = 1.0  # type: ignore[misc]
    assert IndexConfig().kind == "ivf"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["latent.codec=pca", "application=symmetric"], "pixel space"),
        (["latent.codec=vae"], "latent.vae_path"),
        (["latent.codec=pca", "denoiser.backend=exact"], "latent.decode=codec"),
        (["latent.channels=0"], "latent.channels"),
        (["latent.codec=jpeg"], "latent.codec"),
        (["index.kind=hnsw"], "index.kind"),
    ],
)
def test_latent_settings_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline("uncond", overrides)
