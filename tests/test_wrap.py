"""One-axis wrap (``wrap: horizontal | vertical``): settings refused with the key's name, a latent
output's wrapping axis in whole cells, and a 360° panorama whose left and right edges meet.

The bit-for-bit checks (tiled == in memory) are in tests/graph/test_engine.py and test_latent.py;
the seam on the sampler's own output in tests/core/test_sampler.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gigasid.cli import main
from gigasid.config import load_pipeline
from gigasid.errors import ConfigError

ROCKET = Path(__file__).resolve().parent.parent / "examples" / "rocket.png"


@pytest.mark.parametrize(
    "settings,message",
    [
        (["wrap=diagonal"], "wrap"),
        (["application=tileable", "wrap=horizontal"], "tileable wraps both axes"),
        (["application=symmetric", "wrap=vertical"], "symmetric"),
    ],
)
def test_bad_wrap_settings_are_refused_by_name(settings, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_pipeline("uncond", settings)


def test_a_latent_wrap_needs_whole_cells_along_its_axis(tmp_path, capsys) -> None:
    code = main(["generate", str(ROCKET), "-o", str(tmp_path / "p.png"), "--pipeline", "panorama-360",
                 "--size", "190x604"])
    err = capsys.readouterr().err
    assert code == 2 and "190x608" in err and "Traceback" not in err, err  # rows do not wrap: 190 stays


def test_a_360_panorama_joins_left_and_right_not_top_and_bottom(tmp_path, capsys) -> None:
    """The preset's default size from a 186x248 photo: 3x wider, rounded up to whole cells."""
    out = tmp_path / "pano.png"
    assert main(["generate", str(ROCKET), "-o", str(out), "--pipeline", "panorama-360",
                 "--set", "min_short_side=12"]) == 0, capsys.readouterr().err
    grey = np.asarray(Image.open(out).convert("L"), dtype=np.float64)
    assert grey.shape == (186, 744)
    inner_cols = np.abs(np.diff(grey, axis=1)).mean()
    inner_rows = np.abs(np.diff(grey, axis=0)).mean()
    wrap = np.abs(grey[:, 0] - grey[:, -1]).mean() / inner_cols
    top_bottom = np.abs(grey[0] - grey[-1]).mean() / inner_rows
    assert wrap < 1.5 and top_bottom > 2.0, (wrap, top_bottom)


def test_a_given_layout_is_made_to_wrap() -> None:
    """retarget's coarsest scale along a wrapping axis: the jump between its ends is spread over
    the axis, one ramp step at the join; the other axis is untouched."""
    import torch

    from gigasid.plan import given_coarsest

    level = torch.linspace(-1, 1, 12 * 20).reshape(1, 12, 20).repeat(3, 1, 1)
    plain = given_coarsest(level, (12, 40))
    wrapped = given_coarsest(level, (12, 40), (False, True))
    jump = plain[..., 0] - plain[..., -1]
    assert torch.allclose(wrapped[..., 0] - wrapped[..., -1], jump / 40, atol=1e-6)
    assert torch.equal(wrapped[..., 0], plain[..., 0])  # the first column stays where it was
    assert torch.equal(given_coarsest(level, (12, 40), (False, False)), plain)
