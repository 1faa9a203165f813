"""Where Colour-MNIST's do(hue) loses the stroke: the L1 to the exact recolouring by how far the hue moves.

    python benchmarks/colour_hue_shift.py --model checkpoints/in-progress/colour-mnist-conditional \\
        --num-samples 200 --out docs/evaluation-colour-mnist-in-progress/hue-shift.md

The same do(hue) requests as `diffscm evaluate` (the held-out images of `data/colour-mnist`, seed 0) at the model's
settings, grouped by the cosine between the factual and the counterfactual hue's RGB colours; with --shifts, do(hue =
factual hue + each shift) instead, one row per shift (--no-hold-unchanged-parents: see
docs/guidance-of-unchanged-parents.md). A Colour-MNIST stroke is
its grey digit times one RGB colour, so a deterministic abduction leaves the stroke's shape in the noise along that
colour; a model whose flows for two hues agreed would carry the shape over only as far as the two colours overlap.
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from diffscm import hub
from diffscm.colour_mnist import colour, measured_hue_error, true_recolouring
from diffscm.data import heldout_rows, load_image_dataset
from diffscm.evaluation.protocol import intervention_values
from diffscm.options import add_hold_option, config_options
from diffscm.tables import markdown_table

BINS = ((-1.0, 0.3), (0.3, 0.7), (0.7, 1.0))
COLUMNS = ["images", "L1 to the true recolouring", "unchanged image's L1"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A Colour-MNIST pipeline folder.")
    parser.add_argument("--dataset", default="data/colour-mnist", help="Its data (default: the repository's).")
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--out", required=True, help="The Markdown table (a JSON beside it).")
    parser.add_argument("--shifts", type=float, nargs="+", default=None, help="Hue shifts (fractions of the circle).")
    add_hold_option(parser)
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error("--num-samples must be >= 1.")
    return args


def rgb_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The cosine between the full-value RGB colours of hues `a` and `b`."""
    rgb = lambda hues: np.stack([colour(np.full((1, 1), 255), h)[0, 0] / 255.0 for h in hues])  # noqa: E731
    x, y = rgb(a), rgb(b)
    return np.sum(x * y, axis=1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)


@torch.no_grad()
def main(argv=None):
    args = parse_args(argv)
    pipe = hub.load_pipeline(args.model, "cpu", "float32", **config_options(args))
    pipe.set_progress_bar_config(disable=True)
    rows = heldout_rows(args.model, load_image_dataset(dataset_name=args.dataset), args.num_samples)
    graph = pipe.causal_graph
    factual = graph.row_values(rows)
    images = (pipe.preprocess([row["image"] for row in rows]) + 1) / 2
    abduction = pipe.abduct(images, {name: factual[name] for name in graph.image_parents})
    command = shlex.join(["python", *sys.argv])
    if args.shifts:
        intro, header, table = by_shift(pipe, abduction, images, factual, args.shifts)
    else:
        intro, header, table = by_cosine(pipe, abduction, images, factual)
    text = (
        f"{intro} on {len(rows)} held-out images of {args.dataset}, {args.model} (grey levels, 0-255; "
        f"hold_unchanged_parents={pipe.config.hold_unchanged_parents}). `{command}`\n\n"
    )
    text += markdown_table(header, [[r[0], r[1], f"{r[2]:.2f}", f"{r[3]:.2f}"] for r in table])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    record = {"command": command, "rows": [dict(zip(header, row, strict=True)) for row in table]}
    Path(args.out).with_suffix(".json").write_text(json.dumps(record, indent=2, default=float) + "\n")
    print(text)


def by_cosine(pipe, abduction, images: torch.Tensor, factual: dict):
    """The protocol's do(hue) requests, by the cosine between the two hues' RGB colours."""
    expected = intervention_values(pipe.causal_graph, factual, seed=0)["hue"]
    moved, unchanged, counterfactuals = do_hue(pipe, abduction, images, expected)
    cosine = rgb_cosine(factual["hue"], expected["hue"])
    table = []
    for low, high in BINS:
        chosen = (cosine > low) & (cosine <= high)
        if chosen.any():
            table.append([f"({low:g}, {high:g}]", int(chosen.sum()), moved[chosen].mean(), unchanged[chosen].mean()])
    table.append(["all", len(images), moved.mean(), unchanged.mean()])
    error, correlation = measured_hue_error(counterfactuals, expected), np.corrcoef(moved, cosine)[0, 1]
    intro = f"do(hue) (hue error from the pixels {error:.4f}; correlation of L1 with the cosine {correlation:.2f})"
    return intro, ["cosine of the two hues' RGB colours", *COLUMNS], table


def by_shift(pipe, abduction, images: torch.Tensor, factual: dict, shifts: list[float]):
    """do(hue = factual hue + shift), one row per shift."""
    table = []
    for shift in shifts:
        moved, unchanged, _ = do_hue(pipe, abduction, images, shifted(pipe.causal_graph, factual, shift))
        table.append([f"{shift:g}", len(images), moved.mean(), unchanged.mean()])
    return "do(hue = factual hue + shift)", ["hue shift", *COLUMNS], table


def shifted(graph, factual: dict, shift: float) -> dict:
    """Every variable under do(hue = factual hue + `shift`), round the hue circle."""
    return graph.counterfactual(factual, {"hue": (np.asarray(factual["hue"]) + shift) % 1.0})


def do_hue(pipe, abduction, images: torch.Tensor, expected: dict):
    """The counterfactuals' and the unchanged images' L1 to the true recolouring (grey levels, per image), and the
    counterfactuals."""
    counterfactuals = pipe.intervene(abduction, {name: expected[name] for name in pipe.causal_graph.image_parents})
    truth = true_recolouring(images, expected)
    moved = ((counterfactuals - truth).abs().mean(dim=(1, 2, 3)) * 255).numpy()
    unchanged = ((images - truth).abs().mean(dim=(1, 2, 3)) * 255).numpy()
    return moved, unchanged, counterfactuals


if __name__ == "__main__":
    main()
