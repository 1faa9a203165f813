"""The Morpho-MNIST benchmark's own judges (Melistas et al. 2024), loaded from the repository's safetensors copy and
checked against the real Morpho-MNIST test digits shipped in data/morphomnist, and the benchmark's rule for choosing
intervention values."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffscm.data import load_morphomnist
from diffscm.evaluation.benchmark_judges import (
    INTENSITY_RANGE,
    THICKNESS_RANGE,
    BenchmarkJudges,
    benchmark_bin_edges,
    benchmark_input,
    benchmark_intervention_values,
    composition_l1,
    scale,
    unscale,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "morphomnist"
JUDGES = ROOT / "checkpoints" / "benchmark-judges"
NUM_DIGITS = 1000


@pytest.fixture(scope="module")
def judges():
    return BenchmarkJudges.from_pretrained()


@pytest.fixture(scope="module")
def digits():
    rows = load_morphomnist(str(DATA)).select(range(NUM_DIGITS))
    images = np.stack([np.asarray(image, dtype=np.float32) for image in rows["image"]]) / 255.0
    return {
        "images": torch.from_numpy(images)[:, None],
        "thickness": np.asarray(rows["thickness"]),
        "intensity": np.asarray(rows["intensity"]),
        "label": np.asarray(rows["label"]),
    }


def test_judges_agree_with_the_real_digits_as_the_benchmark_reports(judges, digits):
    predicted = judges.predict(digits["images"], digits["intensity"])
    assert {name: values.shape for name, values in predicted.items()} == {
        "thickness": (NUM_DIGITS,),
        "intensity": (NUM_DIGITS,),
        "digit": (NUM_DIGITS,),
    }
    thickness_mae = np.abs(predicted["thickness"] - digits["thickness"]).mean()
    intensity_mae = np.abs(predicted["intensity"] - digits["intensity"]).mean()
    accuracy = (predicted["digit"] == digits["label"]).mean()
    assert thickness_mae == pytest.approx(0.122, abs=0.02)
    assert intensity_mae == pytest.approx(1.54, abs=0.3)
    assert accuracy >= 0.98


def test_batch_statistics_score_as_the_benchmarks_script_ran_the_judges(judges, digits):
    """The benchmark's evaluation never calls .eval(): BatchNorm reads each batch. On real digits that reads
    thickness closer to the data's values than the stored statistics do; the stored ones stay untouched."""
    images, intensity = digits["images"][:257], digits["intensity"][:257]
    stored = {name: value.clone() for name, value in judges.state_dict().items()}
    batch = judges.predict(images, intensity, batch_size=256, batch_statistics=True)  # 256 + 1: one batch of 257
    plain = judges.predict(images, intensity)
    assert all(torch.equal(value, judges.state_dict()[name]) for name, value in stored.items())
    batch_mae = np.abs(batch["thickness"] - digits["thickness"][:257]).mean()
    plain_mae = np.abs(plain["thickness"] - digits["thickness"][:257]).mean()
    assert batch_mae < plain_mae - 0.02 and (batch["digit"] == digits["label"][:257]).mean() >= 0.97


def test_thickness_is_conditioned_on_the_judged_intensity_by_default(judges, digits):
    images = digits["images"][:64]
    own = judges.predict(images)
    given = judges.predict(images, intensity_for_thickness=own["intensity"], batch_size=50)
    np.testing.assert_allclose(given["thickness"], own["thickness"], atol=1e-4)
    np.testing.assert_allclose(given["intensity"], own["intensity"], atol=1e-4)
    shifted = judges.predict(images, intensity_for_thickness=own["intensity"] + 60)
    assert np.abs(shifted["thickness"] - own["thickness"]).mean() > 0.01  # the condition is used


@pytest.mark.parametrize(
    "wrong_transform",
    [
        pytest.param(lambda images: images * 2 - 1, id="no padding"),
        pytest.param(lambda images: F.pad(images, (2, 2, 2, 2)), id="[0, 1] input"),
        pytest.param(lambda images: F.pad(images * 2 - 1, (2, 2, 2, 2)), id="padding after scaling"),
    ],
)
def test_a_wrong_input_transform_scores_clearly_worse(judges, digits, wrong_transform):
    def errors(sample):
        condition = scale(torch.as_tensor(digits["intensity"], dtype=torch.float32)[:, None], INTENSITY_RANGE)
        with torch.no_grad():
            thickness = unscale(judges.judges["thickness"](sample, condition)[:, 0], THICKNESS_RANGE).numpy()
            intensity = unscale(judges.judges["intensity"](sample)[:, 0], INTENSITY_RANGE).numpy()
        return np.abs(thickness - digits["thickness"]).mean(), np.abs(intensity - digits["intensity"]).mean()

    right_thickness, right_intensity = errors(benchmark_input(digits["images"]))
    wrong_thickness, wrong_intensity = errors(wrong_transform(digits["images"]))
    assert right_thickness < 0.14 and right_intensity < 2
    assert wrong_thickness > 1.4 * right_thickness
    assert wrong_intensity > 3 * right_intensity


def test_benchmark_input_pads_with_black_then_scales():
    sample = benchmark_input(torch.ones(2, 1, 28, 28))
    assert sample.shape == (2, 1, 32, 32)
    assert sample[:, :, 2:30, 2:30].eq(1).all() and sample[:, :, :2].eq(-1).all() and sample[..., -2:].eq(-1).all()
    with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
        benchmark_input(torch.zeros(2, 1, 32, 32))


def test_composition_l1_is_the_grey_level_mean_over_the_padded_image(digits):
    images = digits["images"][:8]
    np.testing.assert_array_equal(composition_l1(images, images), np.zeros(8))
    black, white = torch.zeros(3, 1, 28, 28), torch.zeros(3, 1, 28, 28)
    white[0] = 1.0  # every pixel of the 28x28 image: 255 over 784 of the 1024 padded pixels
    white[1, 0, 10, 10] = 0.5  # one pixel half on
    white[2, 0, :2, :] = 1.0  # two full rows of 28
    expected = [255 * 784 / 1024, 127.5 / 1024, 255 * 56 / 1024]
    np.testing.assert_allclose(composition_l1(black, white), expected, rtol=1e-6)
    np.testing.assert_allclose(composition_l1(white, black), expected, rtol=1e-6)


def test_missing_folder_or_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        BenchmarkJudges.from_pretrained(tmp_path / "nowhere")
    folder = tmp_path / "judges"
    shutil.copytree(JUDGES, folder)
    (folder / "intensity.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="intensity.safetensors"):
        BenchmarkJudges.from_pretrained(folder)


def test_truncated_or_mismatched_file_is_named(tmp_path):
    folder = tmp_path / "judges"
    shutil.copytree(JUDGES, folder)
    data = (folder / "thickness.safetensors").read_bytes()
    (folder / "thickness.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="thickness.safetensors"):
        BenchmarkJudges.from_pretrained(folder)
    # The digit judge's weights (10 outputs, no intensity input) in the thickness judge's file.
    shutil.copyfile(JUDGES / "digit.safetensors", folder / "thickness.safetensors")
    with pytest.raises(ValueError, match="thickness.safetensors"):
        BenchmarkJudges.from_pretrained(folder)


@pytest.fixture(scope="module")
def test_values():
    """The 10,000 test thickness and intensity values, the benchmark's pool for choosing interventions."""
    with open(DATA / "t10k-morpho.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {name: np.array([float(row[name]) for row in rows]) for name in ("thickness", "intensity")}


RANGES = {"thickness": THICKNESS_RANGE, "intensity": INTENSITY_RANGE}


@pytest.mark.parametrize("variable", ["thickness", "intensity"])
def test_bin_edges_are_the_data_means_of_nine_equal_intervals(test_values, variable):
    pool = test_values[variable]
    edges = benchmark_bin_edges(variable, pool)
    scaled = scale(pool, RANGES[variable])
    intervals = np.linspace(-1, 1, 10)
    assert len(edges) == 9 and np.all(np.diff(edges) > 0)
    for low, high, edge in zip(intervals[:-1], intervals[1:], edges, strict=True):
        inside = scaled[(scaled >= low) & (scaled < high)]
        assert edge == pytest.approx(inside.mean()) and low <= edge < high


@pytest.mark.parametrize("variable", ["thickness", "intensity"])
def test_interventions_are_pool_values_from_another_bin(test_values, variable):
    pool = test_values[variable]
    factual = pool[:3000]
    chosen = benchmark_intervention_values(variable, factual, pool, seed=1)
    assert chosen.shape == factual.shape
    assert np.isin(chosen, pool).all()  # drawn from the data, not resampled within a bin
    edges = benchmark_bin_edges(variable, pool)
    bins = np.digitize(scale(chosen, RANGES[variable]), edges)
    factual_bins = np.digitize(scale(factual, RANGES[variable]), edges)
    on_an_edge = np.isin(scale(factual, RANGES[variable]), edges)
    assert np.all((bins != factual_bins) | on_an_edge)
    # Uniform over the distinct allowed values: each other bin is drawn in proportion to its number of values.
    middle = np.full(20000, factual[factual_bins == 4][0])
    draws = np.digitize(scale(benchmark_intervention_values(variable, middle, pool), RANGES[variable]), edges)
    counts = np.bincount(np.digitize(scale(np.unique(pool), RANGES[variable]), edges), minlength=10)
    counts[4] = 0
    expected = counts / counts.sum()
    observed = np.bincount(draws, minlength=10) / len(draws)
    np.testing.assert_allclose(observed, expected, atol=0.015)


def test_a_value_on_an_edge_keeps_its_own_bin_allowed_as_in_the_benchmark():
    # Scaled pool -0.95, -0.9 (first interval, mean -0.925) and 0.9 (last interval, alone): edges -0.925 and 0.9.
    # The benchmark bins 0.9 with searchsorted (bin 1) as a factual but with digitize (bin 2) as a candidate, so
    # do() from 0.9 may draw 0.9 itself or -0.95 (bin 0), never -0.9 (bin 1).
    low, high = THICKNESS_RANGE
    pool = (np.array([-0.95, -0.9, 0.9]) + 1) / 2 * (high - low) + low
    draws = benchmark_intervention_values("thickness", np.full(200, pool[2]), pool, seed=3)
    assert set(draws) == {pool[0], pool[2]}
    assert set(benchmark_intervention_values("thickness", np.full(200, pool[0]), pool)) == {pool[1], pool[2]}


def test_digit_interventions_are_uniform_other_digits():
    labels = np.repeat(np.arange(10), 900)
    chosen = benchmark_intervention_values("digit", labels, pool=np.arange(10), seed=5)
    assert chosen.dtype.kind == "i" and np.all(chosen != labels) and np.all((chosen >= 0) & (chosen <= 9))
    for digit in range(10):
        counts = np.bincount(chosen[labels == digit], minlength=10)
        assert counts[digit] == 0 and np.all(np.abs(np.delete(counts, digit) - 100) < 40)
    with pytest.raises(ValueError, match="0..9"):
        benchmark_intervention_values("digit", np.array([3, 10]), np.arange(10))


@pytest.mark.parametrize("variable", ["thickness", "intensity", "digit"])
def test_interventions_are_reproducible_by_seed(test_values, variable):
    factual = np.arange(500) % 10 if variable == "digit" else test_values[variable][:500]
    pool = np.arange(10) if variable == "digit" else test_values[variable]
    first = benchmark_intervention_values(variable, factual, pool, seed=7)
    np.testing.assert_array_equal(first, benchmark_intervention_values(variable, factual, pool, seed=7))
    assert np.any(first != benchmark_intervention_values(variable, factual, pool, seed=8))


def test_unknown_variable_is_named(test_values):
    with pytest.raises(ValueError, match="'slant'"):
        benchmark_intervention_values("slant", test_values["thickness"][:5], test_values["thickness"])
