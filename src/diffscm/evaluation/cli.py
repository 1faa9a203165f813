"""`diffscm evaluate` and `diffscm evaluate-scm`: metrics.json and a Markdown report on held-out images."""

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch


def add_evaluate_command(commands):
    parser = commands.add_parser("evaluate", help="Measure a pipeline on its held-out digits, judged by the oracle.")
    parser.add_argument("--model", default=None, help="Pipeline folder (default: the shipped MNIST one).")
    parser.add_argument("--oracle", default=None, help="Oracle folder (default: the shipped MNIST oracle).")
    parser.add_argument("--vae", default=None, help="VAE folder for CLD (default: the shipped MNIST VAE, if any).")
    parser.add_argument("--num-samples", type=int, default=500)
    parser.add_argument(
        "--data-dir",
        default=None,
        help="Evaluate on a random sample of another labelled folder (imagefolder or Morpho-MNIST) instead of the "
        "pipeline's held-out split of the bundled digits.",
    )
    parser.add_argument("--guidance-scale", type=float, default=None, help="Default: the model's own.")
    parser.add_argument("--guidance-scales", type=float, nargs="*", default=[], help="Scales of the sweep.")
    parser.add_argument("--sweep-samples", type=int, default=100, help="Images for the sweep and reversibility.")
    parser.add_argument("--composition-samples", type=int, default=50, help="Images for composition and abduction.")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--refinement", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random targets.")
    parser.add_argument("--composition-cycles", type=int, default=10, help="Null-intervention cycles (0: skip).")
    parser.add_argument(
        "--abduction-settings",
        nargs="*",
        default=["10:0", "20:0", "50:0", "10:1", "20:1", "25:1", "10:3", "20:3"],
        help="STEPS:REFINEMENT pairs for the curve of reconstruction error against UNet evaluations.",
    )
    parser.add_argument("--out", default="diffscm-evaluation")
    parser.add_argument("--write-model-card", action="store_true", help="Put the report into the model's card.")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=evaluate)

    scm = commands.add_parser(
        "evaluate-scm", help="The counterfactual benchmark's protocol on Morpho-MNIST: do(thickness/intensity/digit)."
    )
    scm.add_argument("--model", required=True, help="A Morpho-MNIST pipeline folder (thickness, intensity, digit).")
    scm.add_argument("--data-dir", required=True, help="The Morpho-MNIST folder the model's split was drawn from.")
    scm.add_argument("--oracle", default=None, help="Digit oracle folder (default: the shipped MNIST oracle).")
    scm.add_argument("--num-samples", type=int, default=500)
    scm.add_argument(
        "--skip", type=int, default=0, help="Leave out the first N held-out images (e.g. those a scale was tuned on)."
    )
    scm.add_argument(
        "--guidance-scale", nargs="+", default=None, help="s, or NAME=s per parent (default: the model's)."
    )
    scm.add_argument(
        "--vae", default=None, help="VAE folder for the CLD of do(digit) (default: the shipped MNIST one)."
    )
    scm.add_argument("--composition-samples", type=int, default=50)
    scm.add_argument("--composition-cycles", type=int, default=10)
    scm.add_argument("--steps", type=int, default=None)
    scm.add_argument("--refinement", type=int, default=None)
    scm.add_argument("--seed", type=int, default=0, help="Seed of the intervened values.")
    scm.add_argument("--out", default="diffscm-evaluation-scm")
    scm.add_argument("--write-model-card", action="store_true", help="Put the report into the model's card.")
    scm.add_argument("--quiet", action="store_true")
    scm.set_defaults(func=evaluate_scm)


def evaluate_scm(args: argparse.Namespace):
    """Benchmark protocol on the model's held-out Morpho-MNIST images; writes metrics.json and report.md."""

    from diffscm.cli import (
        DEFAULT_ORACLE,
        default_checkpoint,
        heldout_rows,
        load_pipeline,
        parse_guidance_scale,
        to_model_images,
    )
    from diffscm.data import load_image_dataset
    from diffscm.evaluation import DigitOracle
    from diffscm.evaluation.metrics import composition
    from diffscm.evaluation.morphomnist import (
        evaluate_interventions,
        morphometrics_agreement,
    )

    if args.num_samples < 2 or args.skip < 0 or args.composition_samples < 1 or args.composition_cycles < 1:
        raise SystemExit("error: --num-samples >= 2, --skip >= 0, --composition-samples/-cycles >= 1 are required.")
    pipe = load_pipeline(args.model, args)
    needed = {"thickness", "intensity", "digit"}
    if not needed <= set(pipe.causal_graph.nodes):
        raise SystemExit(f"error: {args.model} models {list(pipe.causal_graph.nodes)}, not {sorted(needed)}.")
    if not os.path.isdir(args.data_dir):
        raise SystemExit(f"error: --data-dir {args.data_dir!r} is not a folder.")
    dataset = load_image_dataset(train_data_dir=args.data_dir)
    rows = heldout_rows(pipe, dataset, args.num_samples, skip=args.skip)
    if len(rows) < 2:
        raise SystemExit(f"error: only {len(rows)} held-out images remain after --skip {args.skip}.")
    oracle = DigitOracle.from_pretrained(args.oracle or default_checkpoint(DEFAULT_ORACLE)).eval()
    images = to_model_images(pipe, [row["image"] for row in rows])
    factual = pipe.causal_graph.data_values(rows)
    options = {
        "guidance_scale": parse_guidance_scale(args.guidance_scale),
        "num_inference_steps": args.steps,
        "abduction_refinement_steps": args.refinement,
    }
    vae = load_vae(args.vae, pipe)
    result = evaluate_interventions(pipe, oracle, images, factual, seed=args.seed, vae=vae, **options)
    few = slice(0, args.composition_samples)
    result["composition"] = composition(
        pipe, oracle, images[few], {name: value[few] for name, value in factual.items()}, args.composition_cycles,
        args.steps, args.refinement,
    )  # fmt: skip
    result["morphometrics_agreement"] = morphometrics_agreement(images, factual)
    result["settings"] = {
        "model": str(pipe.config._name_or_path),
        "num_images": len(rows),
        "skipped_heldout_images": args.skip,
        "guidance_scale": pipe.guidance_scales(options["guidance_scale"]),
        "num_inference_steps": args.steps or pipe.config.num_inference_steps,
        "abduction_refinement_steps": pipe.config.abduction_refinement_steps if args.refinement is None
        else args.refinement,
        "composition_images": min(args.composition_samples, len(rows)),
        "vae": args.vae or ("the shipped mnist-vae" if vae is not None else None),
    }  # fmt: skip

    os.makedirs(args.out, exist_ok=True)
    (Path(args.out) / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    report = scm_report(result)
    (Path(args.out) / "report.md").write_text(report)
    print(report)
    print(f"Wrote {args.out}/metrics.json and {args.out}/report.md")
    if args.write_model_card:
        write_evaluation_section(result["settings"]["model"], "evaluate-scm", report)


def scm_report(result: dict) -> str:
    from diffscm.evaluation.morphomnist import full_table, report_table

    settings, agreement, composition = result["settings"], result["morphometrics_agreement"], result["composition"]
    cycles = sorted(composition, key=lambda k: int(k.split("_")[1]))
    return "\n".join(
        [
            f"{settings['num_images']} held-out Morpho-MNIST images (after the first "
            f"{settings['skipped_heldout_images']}), guidance scales {settings['guidance_scale']}, "
            f"{settings['num_inference_steps']} DDIM steps, "
            f"{settings['abduction_refinement_steps']} abduction refinement pass(es) per step.",
            "",
            report_table(result),
            "",
            "Published: Melistas et al. 2024 on the full Morpho-MNIST (60k training images, padded to 32x32), with "
            "their own anti-causal predictors as judges; here 9,000 training images at 28x28, judged by morphometrics "
            "and an independent oracle.",
            "",
            full_table(result),
            "",
            "Composition (null intervention repeated, "
            f"{settings['composition_images']} images): "
            + ", ".join(f"{k.replace('_', ' ')}: L1 {composition[k]['l1_grey_levels']:.2f}" for k in cycles)
            + " grey levels.",
            "",
            (
                f"CLD of do(digit), paper / benchmark weights, with {settings['vae']}: "
                f"{result['do(digit)']['cld']['paper']:.3f} / {result['do(digit)']['cld']['benchmark']:.3f}."
                if "cld" in result["do(digit)"]
                else "No VAE, no CLD."
            ),
            "",
            f"Morphometrics of the factual images against the data's sampled values: thickness MAE "
            f"{agreement['thickness']['mae']:.3f} px (r = {agreement['thickness']['correlation']:.3f}), intensity MAE "
            f"{agreement['intensity']['mae']:.2f} (r = {agreement['intensity']['correlation']:.4f}).",
            "",
        ]
    )


def write_evaluation_section(model: str, command_name: str, report: str):
    """Put a report into the pipeline folder's `evaluation.md` and re-render its model card."""
    from diffscm import hub

    if not os.path.isdir(model):
        raise SystemExit(f"error: --write-model-card needs a local pipeline folder, not {model!r}.")
    command = "diffscm " + " ".join(sys.argv[1:]) if sys.argv[1:2] == [command_name] else f"diffscm {command_name}"
    (Path(model) / "evaluation.md").write_text(f"Measured with `{command}`:\n\n{report}")
    hub.write_model_card(model)
    print(f"Updated the model card {model}/README.md")


def evaluate(args: argparse.Namespace):
    from diffscm.cli import DEFAULT_ORACLE, default_checkpoint, load_pipeline, to_model_images
    from diffscm.evaluation import DigitOracle
    from diffscm.evaluation.metrics import (
        abduction_curve,
        composition,
        evaluate_counterfactuals,
        knee,
        reversibility,
        summary_table,
    )
    from diffscm.evaluation.plots import plot_abduction_curve, plot_guidance_sweep

    for name in ("num_samples", "sweep_samples", "composition_samples"):
        if getattr(args, name) < 2:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 2 (realism compares feature sets).")
    if args.composition_cycles < 0:
        raise SystemExit("error: --composition-cycles must be >= 0.")
    if not all(re.fullmatch(r"\d+:\d+", pair) for pair in args.abduction_settings):
        raise SystemExit(f"error: --abduction-settings takes STEPS:REFINEMENT pairs, got {args.abduction_settings}.")
    pipe = load_pipeline(args.model, args)
    oracle_dir = args.oracle or default_checkpoint(DEFAULT_ORACLE)
    oracle = DigitOracle.from_pretrained(oracle_dir).eval()
    digits = evaluation_digits(pipe, args)
    images = to_model_images(pipe, [row["image"] for row in digits])
    labels = torch.tensor([row["label"] for row in digits])
    vae = load_vae(args.vae, pipe)
    scale = pipe.config.guidance_scale if args.guidance_scale is None else args.guidance_scale
    options = {"steps": args.steps, "refinement": args.refinement}

    # Headline numbers at one scale on every image; the sweep and the costlier metrics on the first few.
    result, targets, counterfactuals = evaluate_counterfactuals(
        pipe, oracle, images, labels, [scale], seed=args.seed, vae=vae, **options
    )
    few, fewest = slice(0, args.sweep_samples), slice(0, args.composition_samples)
    if args.guidance_scales:
        sweep, _, _ = evaluate_counterfactuals(
            pipe,
            oracle,
            images[few],
            labels[few],
            sorted(set(args.guidance_scales) | {scale}),
            seed=args.seed,
            vae=vae,
            **options,
        )
        result["sweep"] = {"num_images": sweep["num_images"], "scales": sweep["scales"], "knee": knee(sweep["scales"])}
    result["reversibility"] = reversibility(
        pipe, oracle, images[few], counterfactuals[scale][few], labels[few], targets[few], scale, **options
    )
    factual = {pipe.single_categorical_parent(): labels[fewest]}
    if args.composition_cycles:
        result["composition"] = composition(pipe, oracle, images[fewest], factual, args.composition_cycles, **options)
    settings = [tuple(int(n) for n in pair.split(":")) for pair in args.abduction_settings]
    result["abduction_curve"] = abduction_curve(pipe, images[fewest], settings, factual)
    result["model"] = str(pipe.config._name_or_path)
    result["data"] = args.data_dir or "held-out split of mnist-bundled"
    oracle_record = Path(oracle_dir) / "oracle.json"
    if oracle_record.is_file():
        result["oracle_heldout_accuracy"] = json.loads(oracle_record.read_text())["heldout_accuracy"]

    os.makedirs(args.out, exist_ok=True)
    (Path(args.out) / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    if "sweep" in result:
        plot_guidance_sweep(result["sweep"], Path(args.out) / "guidance_sweep.png")
    if result["abduction_curve"]:
        plot_abduction_curve(result["abduction_curve"], Path(args.out) / "abduction_curve.png")
    report = summary_table(result)
    (Path(args.out) / "report.md").write_text(report)
    print(report)
    print(f"Wrote {args.out}/metrics.json and {args.out}/report.md")
    if args.write_model_card:
        write_evaluation_section(result["model"], "evaluate", report)


def evaluation_digits(pipe, args: argparse.Namespace) -> list[dict]:
    """The pipeline's held-out digits, or a seeded random sample of `--data-dir`."""
    from diffscm.cli import heldout_digits
    from diffscm.data import load_bundled_mnist, load_image_dataset

    if not args.data_dir:
        return heldout_digits(pipe, load_bundled_mnist(), args.num_samples)
    if not os.path.isdir(args.data_dir):
        raise SystemExit(f"error: --data-dir {args.data_dir!r} is not a folder.")
    dataset = load_image_dataset(train_data_dir=args.data_dir)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
    return [dataset[i] for i in order[: args.num_samples].tolist()]


def load_vae(path: str | None, pipe):
    """The VAE for CLD: `--vae`, else the shipped MNIST one when it fits the model's images, else none (no CLD)."""
    from diffscm.cli import default_checkpoint
    from diffscm.evaluation import DigitVAE

    explicit = path is not None
    if not explicit:
        try:
            path = default_checkpoint("mnist-vae")
        except SystemExit:
            return None
    vae = DigitVAE.from_pretrained(path).eval()
    fits = all(vae.config[key] == pipe.unet.config[key] for key in ("sample_size", "in_channels"))
    if not fits and explicit:
        raise SystemExit(f"error: the VAE {path} takes other images than the model ({vae.config.sample_size} px).")
    return vae if fits else None
