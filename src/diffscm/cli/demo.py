"""`diffscm demo`: counterfactuals of held-out digits from a shipped model, as a picture and a table."""

import argparse
import os
from pathlib import Path

import numpy as np
import torch

from .. import hub, morphometrics
from ..data import BUNDLED_MNIST, heldout_rows, load_bundled_mnist, load_image_dataset
from ..options import (
    add_dataset_options,
    add_pipeline_options,
    check_output_dir,
    config_options,
    device_and_dtype,
    pipeline_options,
)
from ..paths import shipped_checkpoint, shipped_data
from ..tables import markdown_table

DEFAULT_ORACLE = "mnist-oracle"


def add_commands(commands):
    parser = commands.add_parser("demo", help="Counterfactuals of held-out digits with a shipped model.")
    add_pipeline_options(parser)
    parser.add_argument("--oracle", default=None, help="Oracle folder (default: the shipped MNIST oracle).")
    parser.add_argument(
        "--num-digits", type=int, default=None, help="Held-out digits, one row each (default: one per class)."
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="For a multi-parent model: the data it held out from (default: the repository's Morpho-MNIST).",
    )
    add_dataset_options(parser, "do() on every variable of the graph, on the model's held-out images of it.")
    parser.add_argument(
        "--classifier",
        default=None,
        help="Explain this transformers image classifier folder: each column is what "
        "would make it say that digit (e.g. checkpoints/mnist-vit-classifier).",
    )
    parser.add_argument(
        "--classifier-scale", type=float, default=None, help="Guidance of the explanations (default: the pipeline's)."
    )
    parser.add_argument("--out", default=None, help="Default: diffscm-demo/MODEL, a folder per model.")
    parser.set_defaults(func=demo)


def demo(args: argparse.Namespace):
    """Counterfactuals of held-out bundled digits under do(digit = 0..9), as a PNG grid and an oracle table."""
    from ..evaluation import DigitOracle
    from ..evaluation.loaders import load_explained_classifier
    from ..evaluation.metrics import oracle_predictions
    from ..evaluation.plots import image_grid

    if args.num_digits is not None and args.num_digits < 1:
        raise ValueError(f"--num-digits must be >= 1, got {args.num_digits}.")
    # A folder per model and setting: the explanations of a classifier do not overwrite the model's own demo.
    setting = f"-explains-{Path(args.classifier).name}" if args.classifier else ""
    args.out = args.out or str(Path("diffscm-demo") / (Path(args.model or hub.DEFAULT_MODEL).name + setting))
    check_output_dir(args.out)
    device, dtype = device_and_dtype(args)
    pipe = hub.load_pipeline(args.model, device, dtype, **config_options(args))
    pipe.set_progress_bar_config(leave=False, disable=args.quiet)
    if len(pipe.causal_graph.image_parents) > 1 or args.dataset:
        return scm_demo(pipe, args)
    oracle = DigitOracle.from_pretrained(args.oracle or shipped_checkpoint(DEFAULT_ORACLE)).eval().to(device)
    rows = heldout_rows(pipe.config._name_or_path, load_bundled_mnist(), 500, source=BUNDLED_MNIST)
    parent = pipe.single_categorical_parent()
    digits = one_per_class(rows, args.num_digits or pipe.causal_graph.nodes[parent].num_classes)
    images, labels = [row["image"] for row in digits], [row["label"] for row in digits]
    num_classes = pipe.causal_graph.nodes[parent].num_classes
    options = pipeline_options(args)
    explained = None
    if args.classifier:
        explained = load_explained_classifier(args.classifier).to(device)
        options |= {"explained_classifier": explained, "guidance_scale": args.classifier_scale}  # None: the default
    print(f"Counterfactuals of {len(images)} held-out digits under do(digit = 0..{num_classes - 1}) ...")
    out = pipe(images, "all", factual_values={parent: labels}, output_type="pt", return_reconstruction=True, **options)

    factual = (pipe.preprocess(images) + 1) / 2
    counterfactuals = out.images.reshape(len(images), num_classes, *out.images.shape[1:])
    columns = torch.cat([factual[:, None], out.reconstructions[:, None], counterfactuals], dim=1)
    predictions = oracle_predictions(oracle, columns.flatten(0, 1)).reshape(len(images), -1)

    os.makedirs(args.out, exist_ok=True)
    grid_path, table_path = Path(args.out) / "counterfactuals.png", Path(args.out) / "oracle.md"
    headers = ["x", "null"] + [f"do({k})" for k in range(num_classes)]
    image_grid(columns, headers).save(grid_path)
    tables = oracle_table(headers, labels, predictions)
    if explained is not None:
        said = explained.predict(columns.flatten(0, 1).to(device) * 2 - 1).cpu().reshape(len(images), -1)
        tables += f"\nPredictions of the explained classifier ({args.classifier}), whose gradient guided:\n\n"
        tables += prediction_table(headers, labels, said)
    table_path.write_text(tables)
    flips = (predictions[:, 2:] == torch.arange(num_classes)).float().mean().item()
    print(table_path.read_text())
    print(f"Oracle agrees with the intervened digit on {flips:.0%} of counterfactuals.")
    if explained is not None:
        agreed = (said[:, 2:] == torch.arange(num_classes)).float().mean().item()
        print(f"The explained classifier says the intervened digit on {agreed:.0%}.")
    print(f"Wrote {grid_path} and {table_path}")


@torch.no_grad()
def scm_demo(pipe, args: argparse.Namespace):
    """Held-out digits of the model's own data under do() on each variable of its causal graph (low and high values
    of continuous ones, the next class of categorical ones), one abduction per digit; a PNG grid and a table of what
    was asked and, for Morpho-MNIST variables, what the morphometrics measure."""
    from ..evaluation.plots import image_grid

    graph = pipe.causal_graph
    if args.dataset:
        dataset = load_image_dataset(dataset_name=args.dataset, image_column=args.image_column)
    else:
        dataset = load_image_dataset(train_data_dir=args.data_dir or shipped_data("morphomnist"))
    rows = heldout_rows(pipe.config._name_or_path, dataset, args.num_digits or 8)
    factual = graph.row_values(rows)
    options = pipeline_options(args)
    scale = options.pop("guidance_scale")
    abduction = pipe.abduct([row["image"] for row in rows], {p: factual[p] for p in graph.image_parents}, **options)
    columns = [(pipe.preprocess([row["image"] for row in rows]) + 1) / 2, pipe.intervene(abduction)]
    headers, asked = ["x", "null"], [factual, factual]
    for name in graph.variables:
        node = graph.nodes[name]
        if node.type == "categorical":
            choices = [("next", (factual.get(name, 0) + 1) % node.num_classes)]
        else:
            low, high = node.range
            choices = [
                (f"{value:g}", value)
                for value in (round(low + 0.15 * (high - low), 1), round(high - 0.15 * (high - low), 1))
            ]
        for label, value in choices:
            expected = graph.counterfactual(factual, {name: value})
            columns.append(
                pipe.intervene(abduction, {p: expected[p] for p in graph.image_parents}, guidance_scale=scale)
            )
            headers.append(f"do({name}={label})")
            asked.append(expected)

    os.makedirs(args.out, exist_ok=True)
    grid_path, table_path = Path(args.out) / "counterfactuals.png", Path(args.out) / "interventions.md"
    image_grid(torch.stack(columns, dim=1), headers, scale=4).save(grid_path)
    measurable = {"thickness", "intensity"} <= set(graph.nodes)
    header = ["column", "asked (mean over digits; classes listed)"]
    header += ["measured thickness", "measured intensity"] if measurable else []
    rows = []
    for name, column, values in zip(headers, columns, asked, strict=True):
        text = ", ".join(
            f"{k} {' '.join(graph.nodes[k].value_name(x) for x in v)}"
            if v.dtype.kind in "iu"
            else f"{k} {np.mean(v):.3g}"
            for k, v in values.items()
        )
        measured = morphometrics.measure(column) if measurable else {}
        cells = [f"{measured['thickness'].mean():.2f}", f"{measured['intensity'].mean():.1f}"] if measurable else []
        rows.append([name, text, *cells])
    lines = [markdown_table(header, rows, [False, False] + [True] * (len(header) - 2))]
    table_path.write_text("\n".join(lines) + "\n")
    print(table_path.read_text())
    print(f"Wrote {grid_path} and {table_path}")


def one_per_class(rows: list[dict], count: int) -> list[dict]:
    """Up to `count` rows with distinct labels in label order (then the remaining rows in order)."""
    first = {}
    for index, row in enumerate(rows):
        first.setdefault(row["label"], index)
    chosen = [first[label] for label in sorted(first)]
    rest = [index for index in range(len(rows)) if index not in set(chosen)]
    return [rows[index] for index in (chosen + rest)[:count]]


def oracle_table(headers: list[str], labels: list[int], predictions: torch.Tensor) -> str:
    return "Oracle predictions (an independent classifier, never used for guidance):\n\n" + prediction_table(
        headers, labels, predictions
    )


def prediction_table(headers: list[str], labels: list[int], predictions: torch.Tensor) -> str:
    rows = [[label, *row] for label, row in zip(labels, predictions.tolist(), strict=True)]
    return markdown_table(["label", *headers], rows, [False] * (len(headers) + 1)) + "\n"
