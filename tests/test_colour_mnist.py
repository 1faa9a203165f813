"""Colour-MNIST: the colouring, its exact do(hue) ground truth and the shipped imagefolder."""

import csv
import json
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest

from diffscm.colour_mnist import CLASS_NAMES, colour, hue_distance, make_colour_mnist, measure_hue, recolour
from diffscm.data import load_bundled_mnist, load_image_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    return load_bundled_mnist().select(range(0, 5000, 250))


def test_recolouring_is_the_exact_counterfactual_of_do_hue(digits):
    for row in digits:
        grey = np.asarray(row["image"])
        assert np.abs(recolour(colour(grey, 0.3), 0.8).astype(int) - colour(grey, 0.8).astype(int)).max() <= 1
        assert np.array_equal(colour(grey, 0.55).max(axis=-1), grey), "the stroke's value is the grey digit"


@pytest.mark.parametrize("hue", [0.05, 0.33, 0.62, 0.9])
def test_the_measured_hue_is_the_drawn_one(digits, hue):
    measured = [measure_hue(colour(np.asarray(row["image"]), hue)) for row in digits]
    assert np.max(hue_distance(measured, hue)) < 0.01


def test_hue_distance_goes_round_the_colour_wheel():
    assert hue_distance(0.02, 0.98) == pytest.approx(0.04)
    assert hue_distance(0.2, 0.5) == pytest.approx(0.3)


def test_each_digit_draws_its_hue_from_its_own_band(digits):
    coloured = make_colour_mnist(digits, seed=0)
    hues, names = np.asarray(coloured["hue"]), coloured["digit"]
    means = np.array([CLASS_NAMES.index(name) for name in names]) / 10 + 0.05
    assert np.all((hues >= 0) & (hues <= 1)) and np.abs(hues - means).max() < 0.25
    measured = [measure_hue(np.asarray(image)) for image in coloured["image"]]
    assert np.nanmax(hue_distance(measured, hues)) < 0.02


def test_the_shipped_imagefolder_reads_as_a_standard_one_with_class_names():
    folder = ROOT / "data" / "colour-mnist"
    ds = load_image_dataset(dataset_name=str(folder))
    assert len(ds) == 5000 and set(ds.column_names) == {"image", "digit", "hue"}
    assert isinstance(ds.features["image"], datasets.Image) and set(ds["digit"]) == set(CLASS_NAMES)
    first = next(csv.DictReader(open(folder / "metadata.csv")))
    image = PIL.Image.open(folder / first["file_name"])
    assert image.mode == "RGB" and image.size == (28, 28)
    assert hue_distance(measure_hue(np.asarray(image)), float(first["hue"])) < 0.02
    bundled = make_colour_mnist(load_bundled_mnist().select(range(3)), seed=0)
    assert np.array_equal(np.asarray(bundled[0]["image"]), np.asarray(image)), "made by the documented command"


def test_extra_training_colourings_leave_out_the_held_out_digits(tmp_path):
    import subprocess
    import sys

    from diffscm.data import split_dataset

    source = tmp_path / "digits"
    for index, row in enumerate(load_bundled_mnist().select(range(0, 5000, 250))):
        (source / str(row["label"])).mkdir(parents=True, exist_ok=True)
        row["image"].save(source / str(row["label"]) / f"{index:03d}.png")
    out = tmp_path / "coloured"
    command = [sys.executable, str(ROOT / "training_scripts" / "make_colour_mnist.py"), "--dataset_name", str(source),
               "--distribution", "independent", "--variants", "2", "--exclude_heldout", "--holdout_size", "4",
               "--output_dir", str(out)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)
    rows = list(csv.DictReader(open(out / "metadata.csv")))
    assert len(rows) == 2 * 16
    digits = load_image_dataset(dataset_name=str(source))
    heldout = {np.asarray(digits[i]["image"]).tobytes() for i in split_dataset(digits, 4)["heldout"]["source_index"]}
    drawn = {np.asarray(PIL.Image.open(out / row["file_name"])).max(-1).tobytes() for row in rows}
    assert len(drawn) == 16 and not drawn & heldout, "no held-out digit in the extra training data"
    hues = np.array([float(row["hue"]) for row in rows])
    assert hues.std() > 0.2, "independent of the digit: spread over the wheel"


def test_the_hue_shift_benchmark_bins_by_how_far_the_two_colours_lie_apart():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from colour_hue_shift import rgb_cosine

    cosine = rgb_cosine(np.array([0.0, 0.0, 0.0, 1 / 6]), np.array([0.0, 0.5, 1 / 3, 0.0]))
    assert np.allclose(cosine, [1.0, 0.0, 0.0, np.sqrt(0.5)])  # red with red, cyan, green; yellow with red


def test_the_small_shift_requests_go_round_the_hue_circle_and_keep_the_digit():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from colour_hue_shift import shifted

    from diffscm.scm import CausalGraph

    index = ROOT / "checkpoints" / "in-progress" / "colour-mnist-conditional" / "model_index.json"
    graph = CausalGraph.from_config(json.loads(index.read_text())["causal_graph"])
    factual = {"digit": np.array([3, 7]), "hue": np.array([0.95, 0.2])}
    request = shifted(graph, factual, 0.1)
    assert np.allclose(request["hue"], [0.05, 0.3]) and list(request["digit"]) == [3, 7]
