"""`diffscm counterfactual`: counterfactuals of the user's own image files."""

import argparse
import os
from pathlib import Path

import numpy as np
import PIL.Image

from .. import hub
from ..options import add_pipeline_options, check_output_dir, parse_assignments, pipeline_options


def add_commands(commands):
    parser = commands.add_parser("counterfactual", help="Counterfactuals of your images.")
    parser.add_argument("images", nargs="+", help="PNG/JPEG files (RGB is converted, other sizes resized).")
    request = parser.add_mutually_exclusive_group(required=True)
    request.add_argument("--target", help="The intervened class, or 'all' (an image with one categorical parent).")
    request.add_argument("--intervention", nargs="+", help="do() on any variables: NAME=VALUE ... (thickness=4).")
    parser.add_argument("--factual", nargs="+", help="Known factual values NAME=VALUE (others are predicted).")
    parser.add_argument("--reconstruction", action="store_true", help="Also write the null intervention.")
    parser.add_argument("--out", default="counterfactuals")
    add_pipeline_options(parser)
    parser.set_defaults(func=counterfactual)


def counterfactual(args: argparse.Namespace):
    """Counterfactuals of the user's images, written as PNG files."""
    check_output_dir(args.out)
    images = [read_image(path) for path in args.images]
    pipe = hub.load_pipeline(args.model)
    pipe.set_progress_bar_config(leave=False, disable=args.quiet)
    request = {"factual_values": parse_assignments(args.factual, "--factual")}
    if args.target is not None:
        parent = pipe.causal_graph.nodes[pipe.single_categorical_parent()]
        request["target"] = parse_target(args.target, parent.num_classes)
    else:
        request["intervention"] = parse_assignments(args.intervention, "--intervention")
    out = pipe(images, **request, return_reconstruction=args.reconstruction, **pipeline_options(args))
    names, per_image = unique_stems(args.images), len(out.images) // len(images)
    if out.predicted_factuals:
        print(f"Factual {', '.join(out.predicted_factuals)} predicted from the image(s) (not given).")
    suffix = "_".join(f"{k}{v}" for k, v in sorted(request.get("intervention", {}).items()))
    for i, image in enumerate(out.images):
        name = f"do{out.targets[i]}" if out.targets is not None else f"do_{suffix}"
        path = Path(args.out) / f"{names[i // per_image]}_{name}.png"
        image.save(path)
        values = ", ".join(f"{k}={_show(v[i])}" for k, v in out.counterfactual_values.items())
        estimates = ", ".join(f"{k}={_show(v[i])}" for k, v in out.predicted_values.items())
        print(f"{path}  counterfactual {values}; predictor reads {estimates}")
    for stem, image in zip(names, out.reconstructions or [], strict=False):
        image.save(Path(args.out) / f"{stem}_null.png")


def unique_stems(paths: list[str]) -> list[str]:
    """File stems for the outputs, `x`, `x-2`, `x-3` ... where several inputs share one, so none overwrites another."""
    seen, stems = {}, []
    for path in paths:
        stem = Path(path).stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return stems


def read_image(path: str) -> PIL.Image.Image:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such image file: {path}")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image.copy()
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"Cannot read {path} as an image: {error}") from error


def parse_target(text: str, num_classes: int):
    if text == "all":
        return "all"
    if not text.isdigit() or int(text) >= num_classes:
        raise ValueError(f"--target must be a class in 0..{num_classes - 1} or 'all', got {text!r}.")
    return int(text)


def _show(value) -> str:
    return f"{value:.2f}" if isinstance(value, float | np.floating) else str(value)
