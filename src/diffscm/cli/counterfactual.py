"""`diffscm counterfactual`: counterfactuals of the user's own image files, or of a whole data set (an imagefolder with
metadata; `accelerate launch -m diffscm.cli counterfactual --data-dir ...` shares it out over processes)."""

import argparse
import glob
import os
from pathlib import Path

import PIL.Image
import PIL.ImageOps

from .. import hub
from ..data import BUNDLED_MNIST, load_image_dataset
from ..dataset_counterfactuals import write_counterfactuals
from ..options import (
    add_dataset_options,
    add_pipeline_options,
    check_output_dir,
    config_options,
    device_and_dtype,
    parse_assignments,
    pipeline_options,
)


def add_commands(commands):
    parser = commands.add_parser("counterfactual", help="Counterfactuals of your images or of a whole data set.")
    parser.add_argument("images", nargs="*", help="PNG/JPEG files (RGB is converted, other sizes resized).")
    data = parser.add_argument_group("a whole data set instead of files (written as an imagefolder, resumable)")
    data.add_argument("--data-dir", default=None, help="An imagefolder tree or a Morpho-MNIST folder.")
    add_dataset_options(data, "every row's counterfactual (or mnist-bundled).")
    data.add_argument("--split", default=None, help="Its split (Hub: default train; Morpho-MNIST: train / test).")
    data.add_argument("--num-images", type=int, default=None, help="Only the first N rows.")
    data.add_argument("--shard-size", type=int, default=256, help="Rows per shard (the unit of work and of resume).")
    data.add_argument("--seed", type=int, default=0, help="Seed of --target random.")
    request = parser.add_mutually_exclusive_group(required=True)
    request.add_argument(
        "--target",
        help="The intervened class, 'all' (every class, from one abduction per image), or for a data set 'random' "
        "(another class per image).",
    )
    request.add_argument("--intervention", nargs="+", help="do() on any variables: NAME=VALUE ... (thickness=4).")
    parser.add_argument("--factual", nargs="+", help="Known factual values NAME=VALUE (others are predicted).")
    parser.add_argument("--reconstruction", action="store_true", help="Also write the null intervention.")
    parser.add_argument("--out", default="counterfactuals")
    parser.add_argument("--overwrite", action="store_true", help="Replace the files an earlier run wrote in --out.")
    add_pipeline_options(parser, dtype="auto")
    parser.set_defaults(func=counterfactual)


def counterfactual(args: argparse.Namespace):
    """Counterfactuals of the user's images, written as PNG files."""
    if args.data_dir or args.dataset:
        return dataset_counterfactuals(args)
    if not args.images:
        raise ValueError("Give image files, or a data set with --data-dir / --dataset.")
    check_output_dir(args.out)
    images = [read_image(path) for path in args.images]
    names = unique_stems(args.images)
    check_outputs_free(Path(args.out), args.images, names, args.overwrite)
    pipe = hub.load_pipeline(args.model, *device_and_dtype(args), **config_options(args))
    pipe.set_progress_bar_config(leave=False, disable=args.quiet)
    request = {"factual_values": parse_assignments(args.factual, "--factual")}
    if args.target is not None:
        parent = pipe.causal_graph.nodes[pipe.single_categorical_parent()]
        request["target"] = parse_target(args.target, parent)
    else:
        request["intervention"] = parse_assignments(args.intervention, "--intervention")
    out = pipe(images, **request, return_reconstruction=args.reconstruction, **pipeline_options(args))
    per_image = len(out.images) // len(images)
    if out.predicted_factuals:
        print(f"Factual {', '.join(out.predicted_factuals)} predicted from the image(s) (not given).")
    graph = pipe.causal_graph
    intervention = {k: graph.check_value(k, v) for k, v in request.get("intervention", {}).items()}
    suffix = "_".join(f"{k}{graph.nodes[k].value_name(v)}" for k, v in sorted(intervention.items()))
    for i, image in enumerate(out.images):
        target = out.targets is not None and graph.show(pipe.single_categorical_parent(), out.targets[i])
        name = f"do{target}" if target else f"do_{suffix}"
        path = Path(args.out) / f"{names[i // per_image]}_{name}.png"
        image.save(path)
        values = ", ".join(f"{k}={graph.show(k, v[i])}" for k, v in out.counterfactual_values.items())
        estimates = ", ".join(f"{k}={graph.show(k, v[i])}" for k, v in out.predicted_values.items())
        print(f"{path}  counterfactual {values}; predictor reads {estimates}")
    for stem, image in zip(names, out.reconstructions or [], strict=False):
        image.save(Path(args.out) / f"{stem}_null.png")


def dataset_counterfactuals(args: argparse.Namespace):
    """Counterfactuals of every row of a data set into an imagefolder, shard by shard, this process's share."""
    if args.images:
        raise ValueError("Give image files or a data set (--data-dir / --dataset), not both.")
    if args.shard_size < 1 or (args.num_images is not None and args.num_images < 1):
        raise ValueError("--shard-size and --num-images must be >= 1.")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}.")
    check_output_dir(args.out)
    dataset = load_image_dataset(
        dataset=args.dataset if args.dataset == BUNDLED_MNIST else None,
        dataset_name=args.dataset if args.dataset not in (None, BUNDLED_MNIST) else None,
        train_data_dir=args.data_dir,
        image_column=args.image_column,
        split=args.split,
    )
    if args.num_images is not None:
        dataset = dataset.select(range(min(args.num_images, len(dataset))))
    pipe = hub.load_pipeline(args.model, *device_and_dtype(args), **config_options(args))
    pipe.set_progress_bar_config(disable=True)
    if args.target is not None:
        parent = pipe.single_categorical_parent()
        if args.target in ("random", "all"):
            request = {args.target: parent} | ({"seed": args.seed} if args.target == "random" else {})
        else:
            request = {"intervention": {parent: parse_target(args.target, pipe.causal_graph.nodes[parent])}}
    else:
        assigned = parse_assignments(args.intervention, "--intervention")
        request = {"intervention": {k: pipe.causal_graph.check_value(k, v).item() for k, v in assigned.items()}}
    written, process = write_counterfactuals(pipe, dataset, request, args.out, args.shard_size, pipeline_options(args))
    print(
        f"Process {process} wrote {written} shard(s) to {args.out}; load them all with "
        f"datasets.load_dataset('imagefolder', data_dir={args.out!r})."
    )


def check_outputs_free(out: Path, paths: list[str], stems: list[str], overwrite: bool = False):
    """Outputs go to `OUT/{stem}_do....png` and `OUT/{stem}_null.png`: an input there with such a name would be
    overwritten, so it is refused before any work, and so is a file of that name an earlier run left (unless
    `overwrite`)."""
    for path in paths:
        source = Path(path).resolve()
        if source.parent == out.resolve() and any(source.name.startswith(f"{stem}_") for stem in stems):
            raise ValueError(
                f"{path} is an input, and an output in --out {out} could take its name: use another --out."
            )
    earlier = sorted(path.name for stem in stems for path in out.glob(f"{glob.escape(stem)}_*.png"))
    if earlier and not overwrite:
        shown = ", ".join(earlier[:5]) + (" ..." if len(earlier) > 5 else "")
        raise FileExistsError(
            f"--out {out} already holds {shown}, which this run could replace: use another --out, or --overwrite."
        )


def unique_stems(paths: list[str]) -> list[str]:
    """File stems for the outputs, `x`, `x-2`, `x-3` ... where several inputs share one, so none overwrites another
    (nor an input that is itself called `x-2`)."""
    used, stems = set(), []
    for path in paths:
        stem, number = Path(path).stem, 1
        while (stem if number == 1 else f"{stem}-{number}") in used:
            number += 1
        stems.append(stem if number == 1 else f"{stem}-{number}")
        used.add(stems[-1])
    return stems


def read_image(path: str) -> PIL.Image.Image:
    """An image file (the pipeline applies its EXIF orientation), refused from its header when it is not an image or
    has more pixels than PIL's decompression-bomb limit."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such image file: {path}")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(f"{path} is too large an image to read ({error}).") from None
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"Cannot read {path} as an image: {error}") from error


def parse_target(text: str, node):
    """--target: a class index or name of the categorical parent `node`, or 'all'."""
    if text == "all":
        return "all"
    if node.classes and text in node.classes:
        return node.classes.index(text)
    names = f" or one of {list(node.classes)}" if node.classes else ""
    if not text.isdecimal() or int(text) >= node.num_classes:
        raise ValueError(f"--target must be a class in 0..{node.num_classes - 1}{names} or 'all', got {text!r}.")
    return int(text)
