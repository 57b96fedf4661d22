"""The bundled demo model learned its data (measured on generated pixels), and `cachepass demo` works."""

from __future__ import annotations

import json
import os
from importlib import resources

import pytest

from cachepass.cli import GIF_HEADER, main
from cachepass.demo.model import WEIGHTS, load_default
from cachepass.demo.shapes import COLORS, DIRECTIONS, SHAPES, caption, describe

AXIS = {"left": "horizontal", "right": "horizontal", "up": "vertical", "down": "vertical", None: None}
# Measured on the shipped weights (seed 0, guidance 4): colour 32/32, motion axis 31/32, direction 17/32 at 20 steps
# and the same at 10, which the test runs (half the time; 8 steps: 32, 30, 16). Left/right and up/down get swapped
# half the time; chance is 8/32.
MIN_AXIS, MIN_DIRECTION = 28, 13


@pytest.fixture(scope="module")
def model():
    return load_default("cpu")


def test_weights_ship_in_the_package_and_load_offline(model):
    path = resources.files("cachepass.demo") / WEIGHTS
    assert os.path.getsize(str(path)) <= 10 * 2**20
    n = sum(p.numel() for p in model.transformer.parameters()) + sum(p.numel() for p in model.text_encoder.parameters())
    assert n == model.card["parameters"] and 1e6 < n < 1e7
    assert type(model.transformer).__name__ == "WanTransformer3DModel"


@pytest.mark.slow  # multi-minute on 2 cores; CI runs it
def test_generated_clips_show_the_captioned_colour_and_motion(model):
    captions = [caption(c, SHAPES[i % len(SHAPES)], d)
                for i, (c, d) in enumerate((c, d) for c in COLORS for d in DIRECTIONS)]
    clips = model.generate(captions, seed=0, steps=10)
    measured = [describe(clip) for clip in clips]
    colours = sum(m[0] == t.split()[1] for m, t in zip(measured, captions))
    axes = sum(AXIS[m[1]] == AXIS[t.split()[4]] for m, t in zip(measured, captions))
    directions = sum(m[1] == t.split()[4] for m, t in zip(measured, captions))
    assert colours == len(captions)
    assert axes >= MIN_AXIS
    assert directions >= MIN_DIRECTION


def test_each_caption_gets_its_own_colour_from_the_same_noise(model):
    cond = model.generate(["a blue square moving down"], seed=3, steps=12)
    other = model.generate(["a orange circle moving up"], seed=3, steps=12)
    assert describe(cond[0])[0] == "blue" and describe(other[0])[0] == "orange"


@pytest.mark.slow  # multi-minute on 2 cores; CI runs it
def test_demo_writes_gif_and_a_consistent_table(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--steps", "12", "--threshold", "0.15", "--inner", "aot_eager", "--repeats", "2",
                 "--captions", "a red circle moving right", "a green triangle moving down", "--out", str(out)])
    assert code == 0
    table = json.loads((out / "table.json").read_text())
    assert [r["caption"] for r in table["rows"]] == ["a red circle moving right", "a green triangle moving down"]
    for row in table["rows"]:
        assert 0 < row["cached_steps"] < 12 and 0 < row["cfg_cached_steps"] < 12
        assert row["speedup"] == pytest.approx(row["uncached_s"] / row["stepcache_s"])
        assert 25 < row["psnr"] and 0.8 < row["ssim"] <= 1.0
    assert table["speedup"] == pytest.approx(table["uncached_s"] / table["stepcache_s"])
    assert table["inner"] == "aot_eager" and table["config"]["threshold"] == 0.15
    from PIL import Image

    gif = Image.open(out / "demo.gif")
    assert gif.n_frames == 8 and gif.size == (3 * 32 * 4 + 16, 2 * 32 * 4 + 16 + GIF_HEADER)
    header = gif.convert("RGB").crop((0, 0, gif.size[0], GIF_HEADER))
    assert len(header.getcolors(1 << 16)) > 1  # the column labels are drawn
    assert table["repeats"] == 2 and table["timing"].startswith("fastest of the interleaved repeats")
    assert all(row["spread"] >= 0 for row in table["rows"])
    printed = capsys.readouterr().out
    assert "a green triangle moving down" in printed and "speedup" in printed


@pytest.mark.parametrize(
    "args,message",
    [
        (["--steps", "1"], "expected an integer >= 2"),
        (["--threshold", "-0.1"], "expected a number >= 0"),
        (["--taylorseer-order", "x"], "expected an integer >= 0"),
        (["--inner", "tensorrt"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--device", "tpu"], "--device 'tpu': allowed cpu, cuda or cuda:N"),
        (["--captions", "a purple circle moving left"], "unknown: ['purple']"),
        (["--captions", "a red circle moving left", " "], "--captions: caption 2 is empty"),
        (["--head", "8"], "--head 8: the demo model has 8 blocks"),
    ],
)
def test_bad_values_are_errors_not_tracebacks(args, message, capsys, tmp_path):
    assert main(["demo", *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    assert "--taylorseer-order" in capsys.readouterr().out


def test_unusable_out_is_refused_before_any_work(tmp_path, capsys):
    existing = tmp_path / "file"
    existing.write_text("")
    assert main(["demo", "--out", str(existing)]) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert main(["demo", "--out", str(existing / "below")]) == 2
    assert "cannot create the folder" in capsys.readouterr().err


def test_device_takes_an_index():
    import torch

    from cachepass.cli import _parse_device

    assert _parse_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert _parse_device("cuda:0") == torch.device("cuda:0")
    else:
        with pytest.raises(ValueError, match="--device cuda:0: no CUDA device is available"):
            _parse_device("cuda:0")
    with pytest.raises(ValueError, match="allowed cpu, cuda or cuda:N"):
        _parse_device("cuda:x")


def test_noisy_timings_are_said_to_be_noisy():
    from cachepass.cli import Row, format_table

    rows = [Row("a red circle moving left", 3.05, 1.2, 3.05 / 1.2, 18, 18, 48.0, 0.999, spread=3.2)]
    summary = {"uncached_s": 3.05, "stepcache_s": 1.2, "speedup": 3.05 / 1.2, "compile_s": 30.0}
    assert "timings are noisy: repeats of one row differ by up to 320%" in format_table(rows, summary)
    rows[0].spread = 0.05
    assert "noisy" not in format_table(rows, summary)
