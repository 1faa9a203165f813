"""Morphometrics: known strokes measure right, the re-drawing moves thickness the right way, bad input is refused."""

from pathlib import Path

import numpy as np
import pytest
import torch

from diffscm import morphometrics

MORPHOMNIST = Path(__file__).resolve().parents[1] / "data" / "morphomnist"


def bar(width: int, level: int = 200) -> np.ndarray:
    """A vertical stroke `width` pixels wide and 16 long, at grey level `level`."""
    image = np.zeros((28, 28), np.uint8)
    image[6:22, 14 - width // 2 : 14 - width // 2 + width] = level
    return image


@pytest.mark.parametrize("width", [2, 3, 5])
def test_a_bar_measures_its_width_and_level(width):
    measured = morphometrics.measure(bar(width))
    assert measured["thickness"][0] == pytest.approx(width, abs=0.5)
    assert measured["intensity"][0] == pytest.approx(200)


def test_thicker_bars_measure_thicker():
    thickness = morphometrics.measure(np.stack([bar(w) for w in (1, 2, 3, 4, 6)]))["thickness"]
    assert np.all(np.diff(thickness) > 0)


def test_redraw_moves_the_thickness_towards_the_target_and_sets_the_intensity():
    image = bar(3, 150)
    for target in (1.5, 5.0):
        drawn = morphometrics.redraw(image, target, 230.0)
        measured = morphometrics.measure(drawn.round().astype(np.uint8))
        assert measured["thickness"][0] == pytest.approx(target, abs=0.4)
        assert measured["intensity"][0] == pytest.approx(230, abs=2)


def test_tensor_and_float_inputs_read_as_unit_range():
    as_tensor = morphometrics.measure(torch.from_numpy(bar(3)).float()[None, None] / 255)
    assert as_tensor["intensity"][0] == pytest.approx(200, abs=0.5)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.full((2, 28, 28), 3.0), r"\[0, 1\]"),
        (np.zeros((2, 3, 28, 28), np.uint8), "one-channel"),
        (np.zeros((28,), np.uint8), "shape"),
    ],
)
def test_bad_images_are_refused(images, message):
    with pytest.raises(ValueError, match=message):
        morphometrics.measure(images)


def test_morphometrics_agree_with_the_sampled_values_of_real_data():
    from diffscm.data import load_morphomnist

    rows = load_morphomnist(str(MORPHOMNIST)).select(range(300))
    measured = morphometrics.measure(np.stack([np.asarray(image) for image in rows["image"]]))
    assert np.abs(measured["thickness"] - np.array(rows["thickness"])).mean() < 0.2
    assert np.abs(measured["intensity"] - np.array(rows["intensity"])).mean() < 1.5
