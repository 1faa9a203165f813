"""The command-line options that several commands and scripts share, defined once, and their parsers."""

import argparse
import os
import platform
import tempfile
from pathlib import Path

from .folder_format import INTEGRATORS


def parse_assignments(pairs: list[str] | None, flag: str, numbers_only: bool = False) -> dict[str, float | str]:
    """`["thickness=4", "color=blue"]` -> `{"thickness": 4.0, "color": "blue"}` (a class name stays a name, for the
    causal graph to map); a variable given twice is refused."""
    values, given = {}, {}
    for pair in pairs or []:
        name, equals, text = pair.partition("=")
        if not name or not equals or not text:
            raise ValueError(f"{flag} takes NAME=VALUE pairs, got {pair!r}.")
        if name in values:
            raise ValueError(f"{flag} gives {name!r} twice ({given[name]} and {pair}); give it once.")
        given[name] = pair
        try:
            values[name] = float(text)
        except ValueError:
            if numbers_only:
                raise ValueError(f"{flag} takes NAME=NUMBER pairs, got {pair!r}.") from None
            values[name] = text
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
    return parse_assignments(values, flag, numbers_only=True)


def add_dataset_options(parser, use: str):
    """--dataset (anything `datasets` reads, whose columns the causal graph's nodes name) and --image-column."""
    parser.add_argument(
        "--dataset",
        default=None,
        help="A data set as `datasets` reads it (a Hub id; a local imagefolder with metadata.csv, parquet or arrow "
        f"files), its columns named by the causal graph's nodes: {use}",
    )
    parser.add_argument("--image-column", default="image", help="The --dataset's image column.")


def add_pipeline_options(
    parser: argparse.ArgumentParser, model_help: str = "the shipped MNIST one", dtype: str = "float32"
):
    """--model and the settings of the pipeline's call, each defaulting to the checkpoint's own (--dtype: `dtype`)."""
    parser.add_argument("--model", default=None, help=f"Pipeline folder or Hub id (default: {model_help}).")
    add_setting_options(parser, dtype)
    add_hold_option(parser)


def add_hold_option(parser: argparse.ArgumentParser):
    """--[no-]hold-unchanged-parents, a loading setting (`config_options`)."""
    parser.add_argument(
        "--hold-unchanged-parents",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Conditional models: anti-causal guidance also holds the parents that an intervention leaves unchanged "
        "(default: the model's).",
    )


def add_setting_options(parser: argparse.ArgumentParser, dtype: str = "float32"):
    """The settings of the pipeline's call (each defaulting to the checkpoint's own), --device, --dtype (default
    `dtype`), --quiet."""
    parser.add_argument(
        "--guidance-scale", nargs="+", default=None, help="Anti-causal guidance: s, or NAME=s per parent."
    )
    parser.add_argument(
        "--cfg-scale", nargs="+", default=None, help="Classifier-free guidance (conditional models): w or NAME=w."
    )
    parser.add_argument(
        "--num-inference-steps", "--steps", type=int, default=None, help="DDIM steps each way (default: the model's)."
    )
    parser.add_argument(
        "--abduction-refinement-steps",
        "--refinement",
        type=int,
        default=None,
        help="Abduction refinement passes per step (default: the model's).",
    )
    parser.add_argument(
        "--integrator",
        default=None,
        choices=INTEGRATORS,
        help="ddim (with the refinement passes), bdia (exactly invertible, one UNet pass per step) or residual (DDIM "
        "that abducts each step's residual too: exact, one more pass per step up; default: the model's).",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps ... (default: cuda when available).")
    parser.add_argument(
        "--dtype",
        default=dtype,
        choices=DTYPES,
        help="Weights' precision; auto: bfloat16 where the device computes it natively (a CPU with AVX512-BF16 or "
        f"AMX, a GPU that supports it), else float32 (default: {dtype}; the chain's states stay in float64, so the "
        "exact integrators stay exact).",
    )
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")


DTYPES = ("float32", "bfloat16", "float16", "auto")


def describe_machine(device: str) -> str:
    """What a benchmark ran on, for its report: the chip by name (speeds differ between CPUs of one architecture),
    the device, the threads and torch."""
    import torch

    if torch.device(device).type == "cuda":
        chip = torch.cuda.get_device_name(torch.device(device))
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = (
            [
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ]
            if cpuinfo.is_file()
            else []
        )
        chip = names[0] if names else platform.processor() or "unnamed CPU"
    return f"{chip} ({platform.machine()}), {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"


def device_and_dtype(args: argparse.Namespace) -> tuple[str, str]:
    """--device (default: cuda when there is one), checked before any work, and --dtype (`auto` resolved)."""
    import torch

    if args.device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return device, native_dtype(device) if args.dtype == "auto" else args.dtype
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, mps, ...): {error}") from None
    if device.type != "cpu":
        module = getattr(torch, device.type, None)
        available = module is not None and hasattr(module, "is_available") and module.is_available()
        count = module.device_count() if available and hasattr(module, "device_count") else 1
        if not available or (device.index or 0) >= count:
            raise ValueError(f"--device {args.device!r}: this machine has no such device.")
    return args.device, native_dtype(args.device) if args.dtype == "auto" else args.dtype


def native_dtype(device: str) -> str:
    """bfloat16 where `device` computes it natively (a CPU with AVX512-BF16 or AMX, where it is 1.1-1.4x faster at
    the same counterfactuals; a CUDA GPU that supports it), else float32 (a CPU without it runs bfloat16 10x
    slower)."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        native = torch.cuda.is_bf16_supported()
    elif kind == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        native = any(getattr(torch.cpu, check, lambda: False)() for check in checks)
    else:
        native = False
    return "bfloat16" if native else "float32"


def pipeline_options(args: argparse.Namespace) -> dict:
    """The pipeline call's keyword arguments from `add_pipeline_options`' flags, named as the pipeline names them
    (None: the model's default)."""
    return {
        "guidance_scale": parse_scale(args.guidance_scale, "--guidance-scale"),
        "cfg_scale": parse_scale(args.cfg_scale, "--cfg-scale"),
        "num_inference_steps": args.num_inference_steps,
        "abduction_refinement_steps": args.abduction_refinement_steps,
        "integrator": args.integrator,
    }


def config_options(args: argparse.Namespace) -> dict:
    """The settings given by `add_hold_option`'s flag that the pipeline takes when it loads, not per call."""
    return {} if args.hold_unchanged_parents is None else {"hold_unchanged_parents": args.hold_unchanged_parents}


def settings_used(pipe, options: dict) -> dict:
    """The settings that a call with `options` runs with: the given ones, the pipeline's config for the rest."""
    used = {key: pipe.config[key] if value is None else value for key, value in options.items()}
    return used | {"hold_unchanged_parents": pipe.config.hold_unchanged_parents}


def check_output_dir(path: str, flag: str = "--out") -> str:
    """Make sure results can be written under `path` before any work starts: a folder that exists or can be made,
    and that accepts a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{flag} {path!r} is a file, not a folder.")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise PermissionError(f"{flag} {path!r} cannot be written: {error.strerror or error}.") from error
    return path
