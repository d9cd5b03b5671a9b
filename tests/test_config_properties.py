"""Property-based tests (hypothesis) of the command line's ``--set`` and ``--size`` parsing and of
the config (issue 13): any value, for any key, known or not, is either accepted and round-trips, or
refused with one line that names the key. Nothing else may escape: no TypeError, no traceback.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gigasid.cli import parse_size
from gigasid.config import JobConfig, from_mapping, load_pipeline, to_mapping
from gigasid.errors import ConfigError, InputError


def _leaf_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            keys += _leaf_keys(hint, f"{prefix}{field.name}.")
        else:
            keys.append(prefix + field.name)
    return keys


LEAVES = _leaf_keys(JobConfig)
SECTIONS = ["denoiser", "index", "latent"]
identifiers = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True)
keys = st.one_of(
    st.sampled_from(LEAVES),
    st.sampled_from(SECTIONS),
    st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(SECTIONS + LEAVES), identifiers),  # unknown or too deep
    identifiers,
)
# raw --set text: YAML scalars of every kind, lists, mappings, and arbitrary text
raw_values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda v: yaml.safe_dump(v).split("\n")[0]),
    st.sampled_from(["true", "false", "null", "", "~", ".inf", "-.inf", ".nan", "[1, 2]", "[0.5,2]", "2x3",
                     "{a: 1}", "[]", "exact", "knn", "ivf", "auto", "pca", "vae", "retarget", "tileable",
                     "symmetric", "both", "1e400", "0x10", "!!binary aGk=", "2020-01-01", "'7'", "=", "a=b"]),
    st.text(max_size=12),
)


def _annotation(key: str):
    cls = JobConfig
    *sections, name = key.split(".")
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    return typing.get_type_hints(cls)[name]


def _typed(annotation) -> st.SearchStrategy[str]:
    """Raw text of plausible values of a field's type (most valid, some just outside)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return st.one_of(st.just("null"), _typed(args[0]))
    if typing.get_origin(annotation) is typing.Literal:
        return st.sampled_from([str(a) for a in args])
    if typing.get_origin(annotation) is tuple:
        return st.lists(st.floats(0.05, 4.0).map(lambda v: f"{v:.3f}"), min_size=2, max_size=2).map(
            lambda pair: f"[{pair[0]}, {pair[1]}]")
    if annotation is int:
        return st.integers(-2, 300).map(str)
    if annotation is float:
        return st.floats(-0.5, 2.0).map(lambda v: f"{v:.4f}")
    return st.text(max_size=8)


typed_pairs = st.sampled_from(LEAVES).flatmap(lambda key: st.tuples(st.just(key), _typed(_annotation(key))))


def _leaf(mapping: dict, key: str):
    for part in key.split("."):
        mapping = mapping[part]
    return mapping


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=st.one_of(st.tuples(keys, raw_values), typed_pairs))
def test_any_set_value_is_accepted_and_round_trips_or_refused_naming_the_key(pair: tuple[str, str]) -> None:
    key, raw = pair
    try:
        config = load_pipeline("smoke", [f"{key}={raw}"])
    except ConfigError as error:
        message = str(error)
        assert "\n" not in message
        named = {key, key.split(".")[0], key.rsplit(".", 1)[-1]}
        assert any(name in message for name in named), (key, raw, message)
        return
    # accepted: the plain data of the config builds the same config, and the stored value given
    # back through --set (as YAML) gives it again
    plain = to_mapping(config)
    assert from_mapping(JobConfig, plain) == config
    if key in LEAVES:
        value = _leaf(plain, key)
        text = yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True)
        again = load_pipeline("smoke", [f"{key}={text.strip().removesuffix('...').strip()}"])
        assert again == config, (key, raw, text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=16))
def test_any_size_text_is_a_positive_size_or_refused_naming_the_option(text: str) -> None:
    try:
        height, width = parse_size(text)
    except InputError as error:
        assert "--size" in str(error) and "\n" not in str(error)
        return
    assert height >= 1 and width >= 1
    assert parse_size(f"{height}x{width}") == (height, width)


@pytest.mark.parametrize("raw", ["[1, .inf]", "[-1, 1]", "[1]", "[a, b]", "0x2"])
def test_output_scale_refusals_name_the_key(raw: str) -> None:
    with pytest.raises(ConfigError, match="output_scale"):
        load_pipeline("smoke", [f"output_scale={raw}"])


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(-(2**66), 2**66), samples=st.integers(-2, 3))
def test_seed_and_samples_are_checked_before_anything_is_read(tmp_path_factory, seed: int, samples: int) -> None:
    """Through the whole command line, with an input that does not exist: a seed range or sample
    count the tool refuses is named; any other run gets as far as the missing input."""
    import contextlib
    import io

    from gigasid.cli import main

    folder = tmp_path_factory.getbasetemp()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["generate", str(folder / "absent.png"), "-o", str(folder / "out.png"),
                     "--seed", str(seed), "--samples", str(samples)])
    message = stderr.getvalue().strip()
    assert code == 2 and message.count("\n") == 0 and message.startswith("gigasid: error: ")
    if samples < 1:
        assert "--samples" in message
    elif not 0 <= seed <= 2**63 - samples:
        assert "--seed" in message and str(seed) in message
    else:
        assert "absent.png" in message and "does not exist" in message
