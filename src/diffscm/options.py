"""The command-line options that several commands and scripts share, defined once, and their parsers."""

import argparse


def parse_assignments(pairs: list[str] | None, flag: str) -> dict[str, float]:
    """`["thickness=4", "digit=3"]` -> `{"thickness": 4.0, "digit": 3.0}`."""
    values = {}
    for pair in pairs or []:
        name, _, text = pair.partition("=")
        try:
            values[name] = float(text)
        except ValueError:
            raise ValueError(f"{flag} takes NAME=NUMBER pairs, got {pair!r}.") from None
    return values


def parse_scale(values: list[str] | None, flag: str = "--guidance-scale") -> float | dict[str, float] | None:
    """`["12"]` -> 12.0; `["digit=12", "thickness=4"]` -> one scale per parent of the image; nothing -> None."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        try:
            return float(values[0])
        except ValueError:
            raise ValueError(f"{flag} takes a number or NAME=NUMBER pairs, got {values[0]!r}.") from None
    return parse_assignments(values, flag)


def add_pipeline_options(parser: argparse.ArgumentParser, model_help: str = "the shipped MNIST one"):
    """--model and the settings of the pipeline's call, each defaulting to the checkpoint's own."""
    parser.add_argument("--model", default=None, help=f"Pipeline folder or Hub id (default: {model_help}).")
    parser.add_argument(
        "--guidance-scale", nargs="+", default=None, help="Anti-causal guidance: s, or NAME=s per parent."
    )
    parser.add_argument(
        "--cfg-scale", nargs="+", default=None, help="Classifier-free guidance (conditional models): w or NAME=w."
    )
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps each way.")
    parser.add_argument("--refinement", type=int, default=None, help="Abduction refinement passes per step.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")


def pipeline_options(args: argparse.Namespace) -> dict:
    """The pipeline call's keyword arguments from `add_pipeline_options`' flags (None: the checkpoint's default)."""
    return {
        "guidance_scale": parse_scale(args.guidance_scale, "--guidance-scale"),
        "cfg_scale": parse_scale(args.cfg_scale, "--cfg-scale"),
        "num_inference_steps": args.steps,
        "abduction_refinement_steps": args.refinement,
    }
