"""The `diffscm` command: `demo`, `counterfactual` and `evaluate`."""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch

from diffscm.data import BUNDLED_MNIST
from diffscm.image_processing import preprocess_images

CHECKPOINTS = "checkpoints"
DEFAULT_MODEL = "diffscm-mnist"
DEFAULT_ORACLE = "mnist-oracle"


def default_checkpoint(name: str) -> str:
    """A shipped checkpoint: under $DIFFSCM_CHECKPOINTS, the repository this package is installed from, or ./."""
    roots = [os.environ.get("DIFFSCM_CHECKPOINTS"), Path(__file__).resolve().parents[2] / CHECKPOINTS, CHECKPOINTS]
    for root in filter(None, roots):
        if (Path(root) / name).is_dir():
            return str(Path(root) / name)
    raise SystemExit(f"error: the shipped checkpoint {name!r} was not found; pass --model (a folder or Hub id).")


def load_pipeline(model: str | None, args: argparse.Namespace):
    from diffscm import DiffSCMPipeline
    from diffscm.pipelines.pipeline_diffscm import local_pipeline_folder

    try:
        # Loading from the resolved folder records it as `_name_or_path`, where training.json is read from.
        pipe = DiffSCMPipeline.from_pretrained(local_pipeline_folder(model or default_checkpoint(DEFAULT_MODEL)))
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load a DiffSCM pipeline from {model!r}: {error}") from error
    pipe.set_progress_bar_config(leave=False, disable=getattr(args, "quiet", False))
    return pipe


def pipeline_options(args: argparse.Namespace) -> dict:
    return {
        "guidance_scale": parse_guidance_scale(args.guidance_scale),
        "num_inference_steps": args.steps,
        "abduction_refinement_steps": args.refinement,
    }


def demo(args: argparse.Namespace):
    """Counterfactuals of held-out bundled digits under do(digit = 0..9), as a PNG grid and an oracle table."""
    from diffscm.data import load_bundled_mnist
    from diffscm.evaluation import DigitOracle

    if args.num_digits < 1:
        raise SystemExit(f"error: --num-digits must be >= 1, got {args.num_digits}.")
    pipe = load_pipeline(args.model, args)
    if len(pipe.causal_graph.image_parents) > 1:
        return scm_demo(pipe, args)
    oracle = DigitOracle.from_pretrained(args.oracle or default_checkpoint(DEFAULT_ORACLE)).eval()
    digits = one_per_class(heldout_digits(pipe, load_bundled_mnist(), 500), args.num_digits)
    images, labels = [row["image"] for row in digits], [row["label"] for row in digits]
    num_classes = pipe.causal_graph.nodes[pipe.single_categorical_parent()].num_classes
    print(f"Counterfactuals of {len(images)} held-out digits under do(digit = 0..{num_classes - 1}) ...")
    out = pipe(images, "all", output_type="pt", return_reconstruction=True, **pipeline_options(args))

    factual = to_model_images(pipe, images)
    counterfactuals = out.images.reshape(len(images), num_classes, *out.images.shape[1:])
    columns = torch.cat([factual[:, None], out.reconstructions[:, None], counterfactuals], dim=1)
    with torch.no_grad():
        predictions = oracle(columns.flatten(0, 1) * 2 - 1).argmax(-1).reshape(len(images), -1)

    os.makedirs(args.out, exist_ok=True)
    grid_path, table_path = Path(args.out) / "counterfactuals.png", Path(args.out) / "oracle.md"
    headers = ["x", "null"] + [f"do({k})" for k in range(num_classes)]
    image_grid(columns, headers).save(grid_path)
    table_path.write_text(oracle_table(headers, labels, predictions))
    flips = (predictions[:, 2:] == torch.arange(num_classes)).float().mean().item()
    print(table_path.read_text())
    print(f"Oracle agrees with the intervened digit on {flips:.0%} of counterfactuals.")
    print(f"Wrote {grid_path} and {table_path}")


@torch.no_grad()
def scm_demo(pipe, args: argparse.Namespace):
    """Held-out digits of the model's own data under do() on each variable of its causal graph (low and high values
    of continuous ones, the next class of categorical ones), one abduction per digit; a PNG grid and a table of what
    was asked and, for Morpho-MNIST variables, what the morphometrics measure."""
    import numpy as np

    from diffscm import morphometrics
    from diffscm.data import load_image_dataset

    if not args.data_dir:
        raise SystemExit("error: this model's image has several parents; pass --data-dir with its data set.")
    graph = pipe.causal_graph
    rows = heldout_rows(pipe, load_image_dataset(train_data_dir=args.data_dir), args.num_digits)
    factual = graph.data_values(rows)
    options = pipeline_options(args)
    steps, scale = options["num_inference_steps"], options["guidance_scale"]
    sample = pipe.preprocess([row["image"] for row in rows])
    parents = {name: factual[name] for name in graph.image_parents}
    abduction = pipe.invert(sample, parents, steps, abduction_refinement_steps=options["abduction_refinement_steps"])
    columns = [(sample + 1) / 2, pipe.intervene(abduction)]
    headers, asked = ["x", "null"], [factual, factual]
    for name in graph.variables:
        node = graph.nodes[name]
        if node.type == "categorical":
            choices = [("next", (factual.get(name, 0) + 1) % node.num_classes)]
        else:
            low, high = node.range
            choices = [(f"{value:g}", value) for value in (round(low + 0.15 * (high - low), 1),
                                                          round(high - 0.15 * (high - low), 1))]  # fmt: skip
        for label, value in choices:
            expected = graph.counterfactual(factual, {name: value})
            columns.append(pipe.intervene(abduction, {p: expected[p] for p in graph.image_parents}, scale))
            headers.append(f"do({name}={label})")
            asked.append(expected)

    os.makedirs(args.out, exist_ok=True)
    grid_path, table_path = Path(args.out) / "counterfactuals.png", Path(args.out) / "interventions.md"
    image_grid(torch.stack(columns, dim=1), headers, scale=4).save(grid_path)
    measurable = {"thickness", "intensity"} <= set(graph.nodes)
    extra = (" measured thickness | measured intensity |", "---:|---:|") if measurable else ("", "")
    lines = ["| column | asked (mean over digits; classes listed) |" + extra[0], "|---|---|" + extra[1]]
    for header, column, values in zip(headers, columns, asked, strict=True):
        text = ", ".join(
            f"{k} {' '.join(map(str, v))}" if v.dtype.kind in "iu" else f"{k} {np.mean(v):.3g}"
            for k, v in values.items()
        )
        measured = morphometrics.measure(column) if measurable else {}
        cells = f" {measured['thickness'].mean():.2f} | {measured['intensity'].mean():.1f} |" if measurable else ""
        lines.append(f"| {header} | {text} |{cells}")
    table_path.write_text("\n".join(lines) + "\n")
    print(table_path.read_text())
    print(f"Wrote {grid_path} and {table_path}")


def heldout_digits(pipe, dataset, count: int):
    """The first `count` held-out digits of the pipeline's recorded split of the bundled MNIST (never trained on)."""
    return heldout_rows(pipe, dataset, count, source=BUNDLED_MNIST)


def heldout_rows(pipe, dataset, count: int, skip: int = 0, source: str | None = None) -> list[dict]:
    """Rows `skip .. skip + count` of the pipeline's recorded held-out split of `dataset` (never trained on); with
    `source`, the split must have been drawn from that data set."""
    record = Path(pipe.config._name_or_path) / "training.json"
    split = json.loads(record.read_text()).get("split", {}) if record.is_file() else {}
    if not split.get("heldout_indices"):
        raise SystemExit(f"error: {record} holds no held-out split; pass images to `diffscm counterfactual` instead.")
    if source is not None and split.get("source") != source:
        raise SystemExit(
            f"error: this model held out images of {split.get('source')!r}, not of {source!r}; evaluate it "
            "with --data-dir on its own data."
        )
    if split.get("num_images", len(dataset)) != len(dataset):
        raise SystemExit(
            f"error: the model's split was drawn from {split.get('num_images')} images of {split.get('source')!r}, "
            f"but this data has {len(dataset)}."
        )
    return [dataset[i] for i in split["heldout_indices"][skip : skip + count]]


def to_model_images(pipe, images) -> torch.Tensor:
    """Images as the model sees them (its channels and size), in [0, 1]."""
    config = pipe.unet.config
    return (preprocess_images(images, config.in_channels, config.sample_size) + 1) / 2


def one_per_class(rows: list[dict], count: int) -> list[dict]:
    """Up to `count` rows with distinct labels in label order (then the remaining rows in order)."""
    first = {}
    for index, row in enumerate(rows):
        first.setdefault(row["label"], index)
    chosen = [first[label] for label in sorted(first)]
    rest = [index for index in range(len(rows)) if index not in set(chosen)]
    return [rows[index] for index in (chosen + rest)[:count]]


def image_grid(columns: torch.Tensor, headers: list[str], scale: int = 3) -> PIL.Image.Image:
    """Rows of images in [0, 1] `(rows, cols, C, H, W)` under a header row, each cell upscaled `scale` times."""
    rows, cols, channels, height, width = columns.shape
    cell_h, cell_w, header = height * scale, width * scale, 14
    grid = PIL.Image.new("RGB", (cols * cell_w, header + rows * cell_h), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for c, text in enumerate(headers):
        draw.text((c * cell_w + 2, 1), text, fill="black")
    pixels = (columns.clamp(0, 1) * 255).round().byte().permute(0, 1, 3, 4, 2).numpy()
    for r in range(rows):
        for c in range(cols):
            cell = PIL.Image.fromarray(pixels[r, c].squeeze(-1) if channels == 1 else pixels[r, c])
            grid.paste(cell.resize((cell_w, cell_h), PIL.Image.NEAREST), (c * cell_w, header + r * cell_h))
    return grid


def oracle_table(headers: list[str], labels: list[int], predictions: torch.Tensor) -> str:
    lines = ["| label | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
    for label, row in zip(labels, predictions.tolist(), strict=True):
        lines.append(f"| {label} | " + " | ".join(str(p) for p in row) + " |")
    return "Oracle predictions (an independent classifier, never used for guidance):\n\n" + "\n".join(lines) + "\n"


def counterfactual(args: argparse.Namespace):
    """Counterfactuals of the user's images, written as PNG files."""
    images = [read_image(path) for path in args.images]
    pipe = load_pipeline(args.model, args)
    request = {"factual_values": parse_assignments(args.factual, "--factual")}
    if args.target is not None:
        parent = pipe.causal_graph.nodes[pipe.single_categorical_parent()]
        request["target"] = parse_target(args.target, parent.num_classes)
    else:
        request["intervention"] = parse_assignments(args.intervention, "--intervention")
    out = pipe(images, **request, return_reconstruction=args.reconstruction, **pipeline_options(args))
    os.makedirs(args.out, exist_ok=True)
    per_image = len(out.images) // len(images)
    if out.predicted_factuals:
        print(f"Factual {', '.join(out.predicted_factuals)} predicted from the image(s) (not given).")
    suffix = "_".join(f"{k}{v}" for k, v in sorted(request.get("intervention", {}).items()))
    for i, image in enumerate(out.images):
        name = f"do{out.targets[i]}" if out.targets is not None else f"do_{suffix}"
        path = Path(args.out) / f"{Path(args.images[i // per_image]).stem}_{name}.png"
        image.save(path)
        values = ", ".join(f"{k}={_show(v[i])}" for k, v in out.counterfactual_values.items())
        estimates = ", ".join(f"{k}={_show(v[i])}" for k, v in out.predicted_values.items())
        print(f"{path}  counterfactual {values}; predictor reads {estimates}")
    for path, image in zip(args.images, out.reconstructions or [], strict=False):
        image.save(Path(args.out) / f"{Path(path).stem}_null.png")


def read_image(path: str) -> PIL.Image.Image:
    if not os.path.isfile(path):
        raise SystemExit(f"error: no such image file: {path}")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image.copy()
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise SystemExit(f"error: cannot read {path} as an image: {error}") from error


def _show(value) -> str:
    return f"{value:.2f}" if isinstance(value, float | np.floating) else str(value)


def parse_assignments(pairs: list[str] | None, flag: str) -> dict[str, float]:
    """`["thickness=4", "digit=3"]` -> `{"thickness": 4.0, "digit": 3.0}`."""
    values = {}
    for pair in pairs or []:
        name, _, text = pair.partition("=")
        try:
            values[name] = float(text)
        except ValueError:
            raise SystemExit(f"error: {flag} takes NAME=NUMBER pairs, got {pair!r}.") from None
    return values


def parse_guidance_scale(values: list[str] | None) -> float | dict[str, float] | None:
    """`["12"]` -> 12.0; `["digit=12", "thickness=4"]` -> one scale per parent of the image."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        try:
            return float(values[0])
        except ValueError:
            raise SystemExit(f"error: --guidance-scale takes a number or NAME=NUMBER, got {values[0]!r}.") from None
    return parse_assignments(values, "--guidance-scale")


def parse_target(text: str, num_classes: int):
    if text == "all":
        return "all"
    if not text.isdigit() or int(text) >= num_classes:
        raise SystemExit(f"error: --target must be a class in 0..{num_classes - 1} or 'all', got {text!r}.")
    return int(text)


def add_pipeline_options(parser: argparse.ArgumentParser):
    parser.add_argument("--model", default=None, help="Pipeline folder or Hub id (default: the shipped MNIST one).")
    parser.add_argument(
        "--guidance-scale", nargs="+", default=None, help="s, or NAME=s per parent (default: the checkpoint's)."
    )
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps each way (default: the checkpoint's).")
    parser.add_argument("--refinement", type=int, default=None, help="Abduction refinement passes per step.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffscm", description="Counterfactual images with Diff-SCM.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo_parser = commands.add_parser("demo", help="Counterfactuals of held-out MNIST digits with the shipped model.")
    add_pipeline_options(demo_parser)
    demo_parser.add_argument("--oracle", default=None, help="Oracle folder (default: the shipped MNIST oracle).")
    demo_parser.add_argument("--num-digits", type=int, default=8)
    demo_parser.add_argument("--data-dir", default=None, help="For a multi-parent model: the data it held out from.")
    demo_parser.add_argument("--out", default="diffscm-demo")
    demo_parser.set_defaults(func=demo)

    cf_parser = commands.add_parser("counterfactual", help="Counterfactuals of your images.")
    cf_parser.add_argument("images", nargs="+", help="PNG/JPEG files (RGB is converted, other sizes resized).")
    request = cf_parser.add_mutually_exclusive_group(required=True)
    request.add_argument("--target", help="The intervened class, or 'all' (an image with one categorical parent).")
    request.add_argument("--intervention", nargs="+", help="do() on any variables: NAME=VALUE ... (thickness=4).")
    cf_parser.add_argument("--factual", nargs="+", help="Known factual values NAME=VALUE (others are predicted).")
    cf_parser.add_argument("--reconstruction", action="store_true", help="Also write the null intervention.")
    cf_parser.add_argument("--out", default="counterfactuals")
    add_pipeline_options(cf_parser)
    cf_parser.set_defaults(func=counterfactual)

    from diffscm.evaluation.cli import add_evaluate_command

    add_evaluate_command(commands)
    return parser


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
