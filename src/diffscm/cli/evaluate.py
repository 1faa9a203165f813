"""`diffscm evaluate` (MNIST-style: one categorical parent) and `diffscm evaluate-scm` (the Morpho-MNIST benchmark's
protocol): metrics.json and a Markdown report on held-out images."""

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from .. import hub
from ..colour_mnist import measured_hue_error, true_recolouring
from ..data import BUNDLED_MNIST, heldout_rows, load_bundled_mnist, load_image_dataset
from ..options import (
    add_dataset_options,
    add_pipeline_options,
    check_output_dir,
    config_options,
    device_and_dtype,
    pipeline_options,
    settings_used,
)
from ..paths import shipped_checkpoint, shipped_data

DEFAULT_SCM_MODEL = "diffscm-morphomnist-conditional"
GENERATION_STEPS = 25  # DDIM steps of the mechanism-alone fidelity (fresh noise, no abduction)


SAVE_DEFAULTS_HELP = (
    "Make the pipeline settings given here (--integrator, --num-inference-steps, ...) the model's defaults, this "
    "command recorded as the evidence in its training.json."
)
CURVE_CYCLES = 10
CURVE_SETTINGS = ["10:0", "20:0", "50:0", "10:1", "20:1", "25:1", "10:3", "20:3"]


def add_commands(commands):
    parser = commands.add_parser("evaluate", help="Measure a pipeline on its held-out digits, judged by the oracle.")
    add_pipeline_options(parser)
    parser.add_argument("--oracle", default=None, help="Oracle folder (default: the shipped MNIST oracle).")
    parser.add_argument("--vae", default=None, help="VAE folder for CLD (default: the shipped MNIST VAE, if any).")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument(
        "--data-dir",
        default=None,
        help="Evaluate on a random sample of another labelled folder (imagefolder or Morpho-MNIST) instead of the "
        "pipeline's held-out split of the bundled digits.",
    )
    add_dataset_options(parser, "the model's held-out images of it, scored for any graph by --judges.")
    parser.add_argument("--judges", default=None, help="With --dataset: the judges' folder from train_judges.py.")
    parser.add_argument("--guidance-scales", type=float, nargs="*", default=[], help="Scales of the sweep.")
    parser.add_argument(
        "--sweep-samples",
        type=int,
        default=None,
        help="Images for the sweep and reversibility (default 100, at most --num-samples).",
    )
    parser.add_argument(
        "--composition-samples",
        type=int,
        default=None,
        help="Images for composition and abduction (default 50, at most --num-samples).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random targets.")
    parser.add_argument(
        "--curves",
        action="store_true",
        help=f"Also the long curves: composition over {CURVE_CYCLES} null-intervention cycles and the abduction "
        "curve over --abduction-settings (without: one cycle, no abduction curve).",
    )
    parser.add_argument(
        "--composition-cycles",
        type=int,
        default=None,
        help=f"Null-intervention cycles (0: skip; default 1, or {CURVE_CYCLES} with --curves).",
    )
    parser.add_argument(
        "--abduction-settings",
        nargs="*",
        default=None,
        help="STEPS:REFINEMENT pairs for the curve of reconstruction error against UNet evaluations (default with "
        f"--curves: {' '.join(CURVE_SETTINGS)}).",
    )
    parser.add_argument(
        "--classifier",
        default=None,
        help="Evaluate counterfactual explanations of this transformers image classifier folder instead (its cheap "
        "and full gradient beside the noise-aware predictor).",
    )
    parser.add_argument(
        "--classifier-scale", type=float, default=None, help="Guidance of the explanations (default: the pipeline's)."
    )
    parser.add_argument("--out", default="diffscm-evaluation")
    parser.add_argument("--write-model-card", action="store_true", help="Put the report into the model's card.")
    parser.add_argument("--save-defaults", action="store_true", help=SAVE_DEFAULTS_HELP)
    parser.set_defaults(func=evaluate)

    scm = commands.add_parser(
        "evaluate-scm", help="The Morpho-MNIST benchmark's protocol: do(thickness / intensity / digit), its judges."
    )
    add_pipeline_options(scm, model_help=f"the shipped {DEFAULT_SCM_MODEL}")
    scm.add_argument(
        "--data-dir", default=None, help="The Morpho-MNIST folder of the model's split (default: the repository's)."
    )
    scm.add_argument("--split", default=None, help="train / test, for a folder holding the official full release.")
    scm.add_argument("--oracle", default=None, help="Digit oracle folder (default: the shipped Morpho-MNIST one).")
    scm.add_argument(
        "--judges", default=None, help="The benchmark's judges' folder (default: the shipped one), or 'none'."
    )
    scm.add_argument("--num-samples", type=int, default=500)
    scm.add_argument(
        "--skip", type=int, default=0, help="Leave out the first N held-out images (e.g. those a scale was tuned on)."
    )
    scm.add_argument("--vae", default=None, help="VAE folder for the CLD of do(digit) (default: the shipped one).")
    scm.add_argument("--composition-samples", type=int, default=100)
    scm.add_argument("--composition-cycles", type=int, default=10)
    scm.add_argument("--seed", type=int, default=0, help="Seed of the intervened values.")
    scm.add_argument("--out", default="diffscm-evaluation-scm")
    scm.add_argument("--write-model-card", action="store_true", help="Put the report into the model's card.")
    scm.add_argument("--save-defaults", action="store_true", help=SAVE_DEFAULTS_HELP)
    scm.set_defaults(func=evaluate_scm)


def evaluate_scm(args: argparse.Namespace):
    """The benchmark's protocol on the model's held-out Morpho-MNIST images; writes metrics.json and report.md."""
    from ..evaluation import DigitOracle, morphomnist
    from ..evaluation.benchmark_judges import BenchmarkJudges
    from ..evaluation.loaders import load_vae

    if args.num_samples < 2 or args.skip < 0 or args.composition_samples < 1 or args.composition_cycles < 1:
        raise ValueError("--num-samples >= 2, --skip >= 0, --composition-samples/-cycles >= 1 are required.")
    pipe, device = load_for_evaluation(args, args.model or shipped_checkpoint(DEFAULT_SCM_MODEL))
    if set(pipe.causal_graph.image_parents) != set(morphomnist.PARENTS):
        raise ValueError(
            f"{args.model}: its image's parents are {pipe.causal_graph.image_parents}, not thickness, "
            "intensity and digit."
        )
    dataset = load_image_dataset(train_data_dir=args.data_dir or shipped_data("morphomnist"), split=args.split)
    rows = heldout_rows(pipe.config._name_or_path, dataset, args.num_samples, skip=args.skip)
    if len(rows) < 2:
        raise ValueError(f"Only {len(rows)} held-out images remain after --skip {args.skip}.")
    oracle = DigitOracle.from_pretrained(args.oracle or shipped_checkpoint("morphomnist-oracle")).eval().to(device)
    judges = None if args.judges == "none" else BenchmarkJudges.from_pretrained(args.judges).to(device)
    images = (pipe.preprocess([row["image"] for row in rows]) + 1) / 2
    factual = pipe.causal_graph.data_values(rows)
    pool = {name: np.asarray(dataset[name]) for name in ("thickness", "intensity")}
    options = pipeline_options(args)
    chain = {key: value for key, value in options.items() if key != "guidance_scale"}
    nfe = unet_evaluations(pipe, images[:1], {k: v[:1] for k, v in factual.items()}, chain)

    result = morphomnist.evaluate_interventions(
        pipe, oracle, images, factual, pool, judges, seed=args.seed, vae=load_vae(args.vae, pipe), **options
    )
    few = slice(0, args.composition_samples)
    result["composition"] = morphomnist.composition(
        pipe, images[few], {name: value[few] for name, value in factual.items()}, args.composition_cycles, **chain
    )
    result["morphometrics_agreement"] = morphomnist.morphometrics_agreement(images, factual)
    result["generation_fidelity"] = morphomnist.generation_fidelity(
        pipe, oracle, factual, judges, (1.0, options["cfg_scale"]), GENERATION_STEPS, args.seed
    )
    split = json.loads((Path(pipe.config._name_or_path) / "training.json").read_text())["split"]
    used = settings_used(pipe, options)
    extra = "".join(f", plus {source}" for source in split.get("extra_train_sources", []))
    result["settings"] = {
        "model": str(pipe.config._name_or_path),
        "mechanism": pipe.mechanism,
        "num_images": len(rows),
        "skipped_heldout_images": args.skip,
        "training_images": f"{split['num_train']:,} training images ({split['source']} less its held-out "
        f"{split['num_heldout']:,}{extra})",
        "guidance_scale": pipe.guidance_scales(options["guidance_scale"]),
        "cfg_scale": pipe.cfg_scales(options["cfg_scale"]),
        **{
            key: used[key]
            for key in ("num_inference_steps", "abduction_refinement_steps", "integrator", "hold_unchanged_parents")
        },
        "unet_evaluations_per_counterfactual": nfe,
        "composition_images": min(args.composition_samples, len(rows)),
        "generation_steps": GENERATION_STEPS,
    }
    write_report(args, "evaluate-scm", result, morphomnist.report(result))


def unet_evaluations(pipe, images: torch.Tensor, factual: dict, chain: dict) -> float:
    """UNet evaluations (image passes) of one abduction and one intervention, per image."""
    from ..evaluation import metrics

    with metrics.count_calls(pipe.unet) as calls:
        pipe.intervene(pipe.abduct(images, factual, **chain))
    return calls["samples"] / len(images)


def scaled_to_the_request(args: argparse.Namespace):
    """The defaults of the sweeps at most --num-samples images, and the long curves only with --curves, so that a
    small --num-samples is a quick run."""
    for name, default in (("sweep_samples", 100), ("composition_samples", 50)):
        if getattr(args, name) is None:
            setattr(args, name, min(default, args.num_samples))
    if args.composition_cycles is None:
        args.composition_cycles = CURVE_CYCLES if args.curves else 1
    if args.abduction_settings is None:
        args.abduction_settings = CURVE_SETTINGS if args.curves else []


def evaluate(args: argparse.Namespace):
    if args.dataset or args.judges:
        return evaluate_graph(args)
    from ..evaluation import DigitOracle, metrics, mnist
    from ..evaluation.loaders import load_explained_classifier, load_vae
    from ..evaluation.plots import plot_abduction_curve, plot_guidance_sweep

    scaled_to_the_request(args)
    for name in ("num_samples", "sweep_samples", "composition_samples"):
        if getattr(args, name) < 2:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 2 (realism compares feature sets).")
    if args.composition_cycles < 0:
        raise ValueError("--composition-cycles must be >= 0.")
    if not all(re.fullmatch(r"\d+:\d+", pair) for pair in args.abduction_settings):
        raise ValueError(f"--abduction-settings takes STEPS:REFINEMENT pairs, got {args.abduction_settings}.")
    pipe, device = load_for_evaluation(args, args.model or shipped_checkpoint(hub.DEFAULT_MODEL))
    oracle_dir = args.oracle or shipped_checkpoint("mnist-oracle")
    oracle = DigitOracle.from_pretrained(oracle_dir).eval().to(device)
    digits = evaluation_digits(pipe, args)
    images = (pipe.preprocess([row["image"] for row in digits]) + 1) / 2
    labels = torch.tensor([row["label"] for row in digits])
    options = pipeline_options(args)
    scale = pipe.guidance_scales(options.pop("guidance_scale"))[pipe.single_categorical_parent()]
    if args.classifier:
        explained = load_explained_classifier(args.classifier).to(device)
        result = metrics.explanation_metrics(
            pipe,
            oracle,
            images,
            labels,
            explained,
            args.classifier_scale or pipe.config.explained_classifier_scale,
            scale,
            args.seed,
            **options,
        )
        result["model"], result["classifier"] = str(pipe.config._name_or_path), args.classifier
        return write_report(args, "evaluate", result, metrics.explanation_table(result))
    settings = [tuple(int(n) for n in pair.split(":")) for pair in args.abduction_settings]
    result = mnist.evaluate(
        pipe,
        oracle,
        images,
        labels,
        scale,
        options,
        load_vae(args.vae, pipe),
        args.seed,
        args.guidance_scales,
        args.sweep_samples,
        args.composition_samples,
        args.composition_cycles,
        settings,
    )
    result["model"] = str(pipe.config._name_or_path)
    result["data"] = args.data_dir or "held-out split of mnist-bundled"
    oracle_record = Path(oracle_dir) / "oracle.json"
    if oracle_record.is_file():
        result["oracle_heldout_accuracy"] = json.loads(oracle_record.read_text())["heldout_accuracy"]
    if "sweep" in result:
        os.makedirs(args.out, exist_ok=True)
        plot_guidance_sweep(result["sweep"], Path(args.out) / "guidance_sweep.png")
    if result["abduction_curve"]:
        os.makedirs(args.out, exist_ok=True)
        plot_abduction_curve(result["abduction_curve"], Path(args.out) / "abduction_curve.png")
    write_report(args, "evaluate", result, metrics.summary_table(result))


def evaluate_graph(args: argparse.Namespace):
    """Any causal graph on the model's held-out images of --dataset, judged by --judges (`evaluation.protocol`)."""
    from ..evaluation import GraphJudges, protocol

    if not (args.dataset and args.judges):
        raise ValueError(
            "Evaluating your own data set needs both --dataset and --judges (train them with "
            "training_scripts/train_judges.py on the same data, --holdout_size and --split_seed as the model)."
        )
    cycles = CURVE_CYCLES if args.composition_cycles is None else args.composition_cycles
    composition_samples = min(args.composition_samples or 50, args.num_samples)
    if args.num_samples < 2 or cycles < 1 or composition_samples < 1:
        raise ValueError("--num-samples must be >= 2, --composition-cycles and --composition-samples >= 1.")
    if not os.path.isdir(args.judges):
        raise FileNotFoundError(f"--judges {args.judges!r} is not a folder (train_judges.py --export_dir).")
    pipe, device = load_for_evaluation(args, args.model or shipped_checkpoint(hub.DEFAULT_MODEL))
    judges = GraphJudges.from_pretrained(args.judges).eval().to(device)
    if set(judges.config.parents) != set(pipe.causal_graph.image_parents):
        raise ValueError(
            f"The judges {args.judges} read {sorted(judges.config.parents)}, but the model's image has the parents "
            f"{sorted(pipe.causal_graph.image_parents)}: train judges for this graph."
        )
    dataset = load_image_dataset(dataset_name=args.dataset, image_column=args.image_column)
    rows = heldout_rows(pipe.config._name_or_path, dataset, args.num_samples)
    graph = pipe.causal_graph
    factual = graph.row_values(rows)
    images = (pipe.preprocess([row["image"] for row in rows]) + 1) / 2
    options = pipeline_options(args)
    colour = (Path(args.dataset) / "colour_mnist.json").is_file()  # written by make_colour_mnist.py
    exact = {"ground_truth": {"hue": true_recolouring}, "measures": {"hue_measured_error": measured_hue_error}}
    result = protocol.evaluate(
        pipe, judges, images, factual, args.seed, cycles, composition_samples, **(exact if colour else {}), **options
    )
    judges_record = Path(args.judges) / "judges.json"
    result |= {
        "model": str(pipe.config._name_or_path),
        "data": args.dataset,
        "judges": args.judges,
        "num_images": len(rows),
        "settings": settings_used(pipe, options),
        "judges_heldout": json.loads(judges_record.read_text())["heldout"] if judges_record.is_file() else None,
    }
    write_report(args, "evaluate", result, protocol.report(result))


def write_report(args: argparse.Namespace, command: str, result: dict, report: str):
    """`metrics.json` and `report.md` under --out, printed; with --write-model-card also into the model's card."""
    os.makedirs(args.out, exist_ok=True)
    (Path(args.out) / "metrics.json").write_text(json.dumps(result, indent=2, default=_plain) + "\n")
    (Path(args.out) / "report.md").write_text(report)
    print(report)
    print(f"Wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'report.md'}")
    model = result.get("model") or result["settings"]["model"]
    if args.write_model_card:
        fidelity = json.loads(json.dumps(result.get("generation_fidelity"), default=_plain))
        hub.write_evaluation(model, _command_line(command), report, fidelity)
        print(f"Updated the model card {model}/README.md")
    if args.save_defaults:
        chosen = settings_given(args)
        hub.write_defaults(model, _command_line(command), **chosen)
        print(f"Made {chosen} the defaults of {model}")


def load_for_evaluation(args: argparse.Namespace, model: str):
    """The pipeline `model` on --device in --dtype, once --out and --save-defaults are checked: (pipe, device)."""
    check_output_dir(args.out)
    check_save_defaults(args, model)
    device, dtype = device_and_dtype(args)
    pipe = hub.load_pipeline(model, device, dtype, **config_options(args))
    pipe.set_progress_bar_config(leave=False, disable=args.quiet)
    return pipe, device


def check_save_defaults(args: argparse.Namespace, model: str):
    """--save-defaults, refused before any work unless settings are given and the model is a local folder."""
    if not args.save_defaults:
        return
    if not settings_given(args):
        raise ValueError("--save-defaults saves the settings given (--integrator, --num-inference-steps): none was.")
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        raise ValueError(f"--save-defaults needs a local pipeline folder, not {model!r}.")


def settings_given(args: argparse.Namespace) -> dict:
    """The settings that the command line names (what --save-defaults saves): the call's and the loading ones."""
    return {key: value for key, value in pipeline_options(args).items() if value is not None} | config_options(args)


def _command_line(command: str) -> str:
    return "diffscm " + " ".join(sys.argv[1:]) if sys.argv[1:2] == [command] else f"diffscm {command}"


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value)


def evaluation_digits(pipe, args: argparse.Namespace) -> list[dict]:
    """The pipeline's held-out digits, or a seeded random sample of `--data-dir`."""
    if not args.data_dir:
        return heldout_rows(pipe.config._name_or_path, load_bundled_mnist(), args.num_samples, source=BUNDLED_MNIST)
    if not os.path.isdir(args.data_dir):
        raise FileNotFoundError(f"--data-dir {args.data_dir!r} is not a folder.")
    dataset = load_image_dataset(train_data_dir=args.data_dir)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
    return [dataset[i] for i in order[: args.num_samples].tolist()]
