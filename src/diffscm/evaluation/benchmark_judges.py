"""
The Morpho-MNIST benchmark's own judges: the three predictors with which Melistas et al. 2024 ("Benchmarking
Counterfactual Image Generation", NeurIPS 2024 Datasets and Benchmarks; github.com/gulnazaki/counterfactual-benchmark,
MIT licence) scored every model in their published Morpho-MNIST table, so that diffscm's counterfactuals can be scored
row for row against the published VAE / HVAE / GAN.

The network is rebuilt here in plain torch from the benchmark's description of it, so neither Lightning nor pickle is
needed; the weights are the benchmark's own, converted to safetensors by `benchmarks/convert_benchmark_judges.py` and
shipped in `checkpoints/benchmark-judges`. Sources (under `counterfactual_benchmark/` in that repository):

- `models/classifiers/classifier.py`: the network (width 8 as `methods/deepscm/evaluate.py` builds it);
- `datasets/morphomnist/dataset.py`: the input transform (28x28 image padded with 2 black pixels to 32x32, grey levels
  0..255 min-max scaled to [-1, 1]) and the fixed min-max constants of thickness and intensity;
- `evaluation/metrics/effectiveness.py`: the scoring (thickness from the image and the counterfactual intensity,
  intensity from the image, digit = argmax);
- `evaluation/metrics/composition.py`: the composition metric (mean |difference| in grey levels, padded images);
- `methods/deepscm/evaluate.py` (`different_value`, `produce_counterfactuals`) with the `bins` and `possible_values`
  of `datasets/morphomnist/dataset.py`: the intervention values (`benchmark_intervention_values`).
"""

import copy
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..paths import shipped_checkpoint

DEFAULT_FOLDER = "benchmark-judges"

# The benchmark's fixed min-max constants: value in [low, high] <-> 2 * (value - low) / (high - low) - 1 in [-1, 1].
THICKNESS_RANGE = (0.87598526, 6.255515)
INTENSITY_RANGE = (66.601204, 254.90317)
PADDING = 2  # 28x28 -> 32x32, black (0) border, added before scaling to [-1, 1]

# name: (number of outputs, extra inputs to the head); the thickness judge is conditioned on the intensity.
JUDGES = {"thickness": (1, 1), "intensity": (1, 0), "digit": (10, 0)}


def scale(value: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """[low, high] -> [-1, 1] with the benchmark's fixed constants."""
    low, high = value_range
    return 2 * (value - low) / (high - low) - 1


def unscale(value: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """[-1, 1] -> [low, high], the inverse of `scale`."""
    low, high = value_range
    return (value + 1) / 2 * (high - low) + low


class BenchmarkClassifier(nn.Module):
    r"""
    The benchmark's predictor (`Classifier` in its `models/classifiers/classifier.py`, itself taken from
    biomedia-mira/causal-gen): six bias-free convolutions, each followed by BatchNorm and LeakyReLU (slope 0.01),
    a 7x7 stem at stride 1 then 3x3 convolutions at strides 2, 1, 2, 1, 2 (32x32 -> 4x4, widths w, 2w, 2w, 4w, 4w,
    8w); global average pooling; a head Linear(8w + context, 8w, no bias) - BatchNorm1d - LeakyReLU - Linear(8w, out),
    where `context` extra inputs (the thickness judge: the scaled intensity) are concatenated to the pooled features.
    Module indices match the benchmark's `state_dict` keys (`cnn.3` is the pooling slot, an identity at 32x32).
    """

    def __init__(self, num_outputs: int = 1, context_dim: int = 0, width: int = 8, in_channels: int = 1):
        super().__init__()
        self.context_dim = context_dim
        widths = [width, 2 * width, 2 * width, 4 * width, 4 * width, 8 * width]
        strides = [2, 1, 2, 1, 2]
        layers = [nn.Conv2d(in_channels, width, 7, 1, 3, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU()]
        layers.append(nn.Identity())  # the benchmark max-pools here only for inputs larger than 32x32
        for previous, current, stride in zip(widths[:-1], widths[1:], strides, strict=True):
            layers += [nn.Conv2d(previous, current, 3, stride, 1, bias=False), nn.BatchNorm2d(current), nn.LeakyReLU()]
        self.cnn = nn.Sequential(*layers)
        self.fc = nn.Sequential(
            nn.Linear(8 * width + context_dim, 8 * width, bias=False),
            nn.BatchNorm1d(8 * width),
            nn.LeakyReLU(),
            nn.Linear(8 * width, num_outputs),
        )

    def forward(self, sample: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Raw outputs for padded images `(B, 1, 32, 32)` in [-1, 1] and, if conditioned, `context` `(B, C)`."""
        features = self.cnn(sample).mean(dim=(-2, -1))
        if self.context_dim:
            if context is None:
                raise ValueError(f"this judge takes {self.context_dim} conditioning input(s); none was given.")
            features = torch.cat([features, context.reshape(len(features), self.context_dim).to(features)], dim=-1)
        return self.fc(features)


def benchmark_input(images: torch.Tensor) -> torch.Tensor:
    """`(B, 1, 28, 28)` images in [0, 1] -> the benchmark's input: padded with black to 32x32, scaled to [-1, 1]."""
    return torch.nn.functional.pad(check_images(images), (PADDING,) * 4, value=0.0) * 2 - 1


def check_images(images) -> torch.Tensor:
    images = torch.as_tensor(images, dtype=torch.float32).cpu()
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(f"expected images of shape (B, 1, 28, 28) in [0, 1], got {tuple(images.shape)}.")
    return images


def composition_l1(a, b) -> np.ndarray:
    """
    The benchmark's composition distance per image: the mean absolute difference in 0-255 grey levels between two
    `(B, 1, 28, 28)` batches in [0, 1], taken over the padded 32x32 images (so 784/1024 of the 28x28 mean; the
    black border never differs). Average the returned `(B,)` array for the published number.
    """
    a, b = benchmark_input(a), benchmark_input(b)
    if a.shape != b.shape:
        raise ValueError(f"the two batches differ in shape: {tuple(a.shape)} and {tuple(b.shape)}.")
    return ((a - b).abs() * 127.5).mean(dim=(1, 2, 3)).double().numpy()


NUM_INTERVALS = 9  # the benchmark cuts the scaled [-1, 1] range into 9 equal intervals (np.linspace(-1, 1, 10))
SCALED_VARIABLES = {"thickness": THICKNESS_RANGE, "intensity": INTENSITY_RANGE}


def benchmark_bin_edges(variable: str, pool: np.ndarray) -> np.ndarray:
    """
    The edges of the benchmark's intervention bins for `thickness` or `intensity`, on the scaled [-1, 1] values.

    `MorphoMNISTLike.bins` (`datasets/morphomnist/dataset.py`) cuts [-1, 1] into 9 equal intervals and keeps the mean
    of the data set's (scaled) values inside each one; `different_value` (`methods/deepscm/evaluate.py`) then uses
    these 9 means as the *edges* of 10 bins, not as centres. An interval without data has no mean (NaN in the
    benchmark, where `np.digitize` would then refuse the edges); it is left out here.
    """
    value_range = _value_range(variable)
    scaled = scale(_values(pool, "pool"), value_range)
    interval = np.digitize(scaled, np.linspace(-1, 1, NUM_INTERVALS + 1))  # 1..9 inside [-1, 1)
    return np.array([scaled[interval == i].mean() for i in range(1, NUM_INTERVALS + 1) if (interval == i).any()])


def benchmark_intervention_values(variable: str, factual: np.ndarray, pool: np.ndarray, seed: int = 0) -> np.ndarray:
    """
    The Morpho-MNIST benchmark's intervention value for each factual value (`produce_counterfactuals` with
    `force_change=True` in `methods/deepscm/evaluate.py`; effectiveness is scored with one do() per attribute).

    - `thickness` / `intensity` (`factual` and `pool` in px / grey levels): a value drawn uniformly from the distinct
      values of `pool` (the benchmark: `torch.unique` of the 10,000 test values, which also supply the bins) whose
      bin differs from the factual value's, the bins being cut at the edges of `benchmark_bin_edges`. As in the
      benchmark, the factual bin is `searchsorted(edges, value)` and a pool value's bin is `digitize(value, edges)`,
      which disagree only for a value equal to an edge (then its own bin's values stay allowed). The drawn value is
      returned as it is in `pool`, not resampled inside the bin.
    - `digit` (`factual` labels 0..9): a uniformly random other digit.

    Only the intervened variable is set here: in the benchmark's SCM (thickness -> intensity), do(thickness) also
    changes intensity through the intensity mechanism with the abducted noise, and the judges score that
    counterfactual intensity. Draws come from `np.random.default_rng(seed)`.
    """
    rng = np.random.default_rng(seed)
    if variable == "digit":
        labels = _values(factual, "factual")
        if not np.isin(labels, np.arange(10)).all():
            raise ValueError("digit labels must be integers 0..9.")
        return (labels.astype(np.int64) + rng.integers(1, 10, size=len(labels))) % 10
    value_range = _value_range(variable)
    pool = _values(pool, "pool")
    if len(pool) == 0:
        raise ValueError(f"the {variable} pool is empty.")
    candidates = np.unique(pool)  # the benchmark's `possible_values`; its bins use every value, repeats included
    edges = benchmark_bin_edges(variable, pool)
    candidate_bins = np.digitize(scale(candidates, value_range), edges)
    factual = _values(factual, "factual")
    factual_bins = np.searchsorted(edges, scale(factual, value_range))
    chosen = np.empty(len(factual))
    for bin_index in np.unique(factual_bins):
        allowed = candidates[candidate_bins != bin_index]
        if len(allowed) == 0:
            raise ValueError(f"no {variable} value of the pool lies outside the factual bin {bin_index}.")
        rows = np.flatnonzero(factual_bins == bin_index)
        chosen[rows] = allowed[rng.integers(0, len(allowed), size=len(rows))]
    return chosen


def _value_range(variable: str) -> tuple[float, float]:
    if variable not in SCALED_VARIABLES:
        raise ValueError(f"unknown variable {variable!r}; expected 'thickness', 'intensity' or 'digit'.")
    return SCALED_VARIABLES[variable]


def _values(values, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(values).all():
        raise ValueError(f"{name} holds non-finite values.")
    return values


class BenchmarkJudges(nn.Module):
    """
    The benchmark's thickness, intensity and digit judges. Load with `BenchmarkJudges.from_pretrained()`, then
    `predict(images)`; move with `.to(device)`.

    Measured on the 10,000 real Morpho-MNIST test digits (see the folder's README.md): thickness MAE 0.122 px given the
    true intensity, intensity MAE 1.54 grey levels, digit accuracy 0.9905.
    """

    def __init__(self):
        super().__init__()
        self.judges = nn.ModuleDict(
            {name: BenchmarkClassifier(outputs, context) for name, (outputs, context) in JUDGES.items()}
        )

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike | None = None) -> "BenchmarkJudges":
        """Load `thickness.safetensors`, `intensity.safetensors` and `digit.safetensors` from `folder` (default: the
        shipped `checkpoints/benchmark-judges`) strictly; the judges come back in eval mode."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder) if folder is not None else Path(shipped_checkpoint(DEFAULT_FOLDER))
        if not folder.is_dir():
            raise FileNotFoundError(f"benchmark judges folder {str(folder)!r} does not exist.")
        judges = cls()
        for name, judge in judges.judges.items():
            path = folder / f"{name}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"benchmark judge file {str(path)!r} is missing.")
            try:
                state = load_file(str(path))
            except (SafetensorError, OSError, ValueError) as error:
                raise ValueError(f"{path}: not a readable safetensors file ({error}).") from error
            try:
                judge.load_state_dict(state, strict=True)
            except RuntimeError as error:
                raise ValueError(f"{path}: does not hold the benchmark's {name} judge ({error}).") from error
        return judges.eval()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def predict(
        self, images, intensity_for_thickness=None, batch_size: int = 1000, batch_statistics: bool = False
    ) -> dict[str, np.ndarray]:
        """
        Judge `(B, 1, 28, 28)` images in [0, 1]: `thickness` (px), `intensity` (grey levels) and `digit` (argmax
        class), as numpy arrays of length B.

        The thickness judge is conditioned on an intensity, as the benchmark scores it with the counterfactual's
        intended intensity: pass it in grey levels as `intensity_for_thickness` `(B,)`; by default the intensity
        judge's own reading is used. The intensity output is the raw regression (no sigmoid): the shipped judge was
        trained with MSE on [-1, 1] targets before the benchmark's code put a sigmoid on it.

        With `batch_statistics`, BatchNorm normalises each batch of `batch_size` by its own statistics, as the
        benchmark's evaluation script ran these judges (it never calls `.eval()`); the stored statistics are untouched.
        """
        images = check_images(images)
        if intensity_for_thickness is not None:
            intensity_for_thickness = torch.as_tensor(intensity_for_thickness, dtype=torch.float32).reshape(-1)
            if len(intensity_for_thickness) != len(images):
                raise ValueError(f"{len(intensity_for_thickness)} intensities given for {len(images)} images.")
        judges = copy.deepcopy(self.judges).train() if batch_statistics else self.judges
        outputs = {name: [] for name in JUDGES}
        bounds = list(range(0, len(images), batch_size)) + [len(images)]
        if batch_statistics and len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            del bounds[-2]  # batch statistics need two samples: the last one joins the batch before
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True) if len(images) else [(0, 0)]:
            sample = benchmark_input(images[start:stop]).to(self.device)
            intensity = judges["intensity"](sample)
            if intensity_for_thickness is None:
                condition = intensity
            else:
                condition = scale(intensity_for_thickness[start:stop, None], INTENSITY_RANGE)
            thickness = judges["thickness"](sample, condition.to(self.device))
            outputs["thickness"].append(unscale(thickness[:, 0], THICKNESS_RANGE))
            outputs["intensity"].append(unscale(intensity[:, 0], INTENSITY_RANGE))
            outputs["digit"].append(judges["digit"](sample).argmax(-1))
        return {name: torch.cat(values).cpu().numpy() for name, values in outputs.items()}
