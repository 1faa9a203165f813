"""Colour-MNIST: digit -> hue -> image, with an exact ground truth for do(hue).

The rule of Monteiro et al. (ICLR 2023, "Measuring axiomatic soundness of counterfactual image models"; their
`datasets/confounded_mnist.py`, scenario `digit_hue`): a digit k's hue is drawn from N(k / 10 + 0.05, sigma), and
the grey digit is coloured in HSV with that hue, saturation 1 and the grey level as value (black background). Ours
takes sigma = 0.05, draws no uniform outliers and clips the hue to [0, 1] (their raw hue could leave the colour
wheel). Since the stroke's value is the grey digit, the grey digit is the image's largest channel, and the same
digit in another hue is known exactly: `recolour`.
"""

import csv
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch
from skimage.color import hsv2rgb, rgb2hsv

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
HUE_STD = 0.05


def hue_mean(digit: np.ndarray) -> np.ndarray:
    return np.asarray(digit) / 10 + 0.05


def sample_hue(digits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each digit's hue: N(k / 10 + 0.05, 0.05), clipped to [0, 1]."""
    return np.clip(hue_mean(digits) + HUE_STD * rng.standard_normal(len(digits)), 0.0, 1.0)


def colour(grey: np.ndarray, hue: float) -> np.ndarray:
    """A grey digit (H, W) in [0, 255] coloured with `hue`: HSV (hue, 1, grey / 255) as RGB uint8 (H, W, 3)."""
    value = np.asarray(grey, np.float64) / 255.0
    hsv = np.stack([np.full_like(value, hue % 1.0), np.ones_like(value), value], axis=-1)
    return np.clip(np.round(hsv2rgb(hsv) * 255), 0, 255).astype(np.uint8)


def recolour(rgb: np.ndarray, hue: float) -> np.ndarray:
    """The same digit in another hue (the exact counterfactual of do(hue)): its grey is the largest channel."""
    return colour(np.asarray(rgb).max(axis=-1), hue)


def measure_hue(rgb: np.ndarray, threshold: float = 0.5) -> float:
    """The stroke's hue as Monteiro et al. measure it: the median hue of the pixels brighter than `threshold`
    (NaN for an image without such pixels)."""
    hsv = rgb2hsv(np.asarray(rgb, np.uint8))
    bright = hsv[..., 2] > threshold
    return float(np.median(hsv[..., 0][bright])) if bright.any() else float("nan")


def hue_distance(a, b) -> np.ndarray:
    """|a - b| on the colour wheel (hue 0 and hue 1 are the same red)."""
    difference = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) % 1.0
    return np.minimum(difference, 1.0 - difference)


def make_colour_mnist(dataset: datasets.Dataset, seed: int = 0, distribution: str = "data") -> datasets.Dataset:
    """Every digit of an `image` / integer `label` data set coloured by the rule above (`distribution="data"`), or
    with a hue drawn uniformly from [0, 1] whatever the digit (`"independent"`: the unconfounded data on which judges
    are trained, so that they cannot read the digit from its colour): `image`, `digit` (class names) and `hue`."""
    if distribution not in ("data", "independent"):
        raise ValueError(f"Unknown distribution {distribution!r}; use 'data' or 'independent'.")
    rng = np.random.default_rng(seed)
    digits = np.asarray(dataset["label"])
    hues = sample_hue(digits, rng) if distribution == "data" else rng.uniform(0.0, 1.0, len(digits))
    images = [
        PIL.Image.fromarray(colour(np.asarray(image.convert("L")), hue))
        for image, hue in zip(dataset["image"], hues, strict=True)
    ]
    columns = {"image": images, "digit": [CLASS_NAMES[d] for d in digits], "hue": hues.round(6).tolist()}
    features = datasets.Features(
        {"image": datasets.Image(), "digit": datasets.Value("string"), "hue": datasets.Value("float64")}
    )
    return datasets.Dataset.from_dict(columns, features=features)


def save_imagefolder(dataset: datasets.Dataset, folder: str | Path):
    """A standard `imagefolder`: one PNG per row and `metadata.csv` (`file_name` and every other column)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    columns = [name for name in dataset.column_names if name != "image"]
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", *columns])
        for index, row in enumerate(dataset):
            name = f"images/{index:05d}.png"
            row["image"].save(folder / name)
            writer.writerow([name, *(row[column] for column in columns)])


def true_recolouring(images: torch.Tensor, expected: dict) -> torch.Tensor:
    """The exact counterfactuals of do(hue): each factual image `(B, 3, H, W)` in [0, 1] in its expected hue."""
    pixels = (images.detach().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    drawn = np.stack([recolour(image, hue) for image, hue in zip(pixels, expected["hue"], strict=True)])
    return torch.from_numpy(drawn).permute(0, 3, 1, 2).float() / 255


def measured_hue_error(images: torch.Tensor, expected: dict) -> float:
    """Mean distance on the colour wheel between each image's measured hue (`measure_hue`) and the expected one."""
    pixels = (images.detach().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    measured = np.array([measure_hue(image) for image in pixels])
    return float(np.nanmean(hue_distance(measured, expected["hue"])))
