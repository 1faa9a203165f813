"""Choose the guidance of each parent of a Morpho-MNIST pipeline by measurement, on a tuning subset.

    python benchmarks/tune_scm_guidance.py --model checkpoints/diffscm-morphomnist-conditional --num-samples 100 \\
        --cfg-scale thickness=1,2 intensity=1,2 digit=1,3 --guidance-scale digit=0,8

Uses the first --num-samples images of the model's held-out split (report the chosen setting on the rest with
`diffscm evaluate-scm --skip N`). Every combination of the listed values is tried: one abduction per classifier-free
setting (the abduction depends on it), every anti-causal setting on top. Each is scored by the benchmark's own judges
under the benchmark's do(thickness), do(intensity) and do(digit), and ranked by the mean of the three effectiveness
errors and two side effects, each divided by its target (thickness 0.08 px, intensity 3, digit error 0.02, thickness
moved by do(intensity) 0.15 px, intensity moved by do(digit) 4). --save-defaults makes the best setting the
pipeline folder's defaults and records this command in its `training.json` and card.
"""

import argparse
import itertools
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from diffscm import hub
from diffscm.data import heldout_rows, load_image_dataset
from diffscm.evaluation import DigitOracle
from diffscm.evaluation.benchmark_judges import BenchmarkJudges
from diffscm.evaluation.morphomnist import PARENTS, intervention_requests, judge
from diffscm.folder_format import INTEGRATORS
from diffscm.options import add_hold_option, config_options
from diffscm.paths import shipped_checkpoint, shipped_data
from diffscm.tables import markdown_table

TARGETS = {"t": 0.08, "i": 3.0, "digit error": 0.02, "t moved by do(i)": 0.15, "i moved by do(digit)": 4.0}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir", default=None, help="Default: the repository's Morpho-MNIST test split.")
    parser.add_argument("--oracle", default=None, help="Default: the shipped Morpho-MNIST oracle.")
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--cfg-scale", nargs="*", default=[], help="NAME=v1,v2,... classifier-free values to try.")
    parser.add_argument("--guidance-scale", nargs="*", default=[], help="NAME=v1,v2,... anti-causal values to try.")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--refinement", type=int, default=None)
    parser.add_argument("--integrator", default=None, choices=INTEGRATORS, help="Default: the model's.")
    add_hold_option(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--save-defaults", action="store_true", help="Write the best setting into the --model folder.")
    parser.add_argument("--out", default="docs/evaluation-morphomnist-conditional-tuning/tuning.json")
    args = parser.parse_args(argv)
    if args.save_defaults and not (Path(args.model) / "model_index.json").is_file():
        parser.error(f"--save-defaults writes into a local pipeline folder; --model {args.model!r} is none.")
    return args


def grid(pairs: list[str]) -> list[dict[str, float]]:
    """["digit=1,3", "thickness=2"] -> [{"digit": 1, "thickness": 2}, {"digit": 3, "thickness": 2}]."""
    axes = {}
    for pair in pairs:
        name, _, values = pair.partition("=")
        axes[name] = [float(value) for value in values.split(",")]
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def summary(entry: dict) -> dict[str, float]:
    family = "benchmark"
    return {
        "t": entry["do(thickness)"][family]["thickness_mae"],
        "i": entry["do(intensity)"][family]["intensity_mae"],
        "digit error": 1 - entry["do(digit)"][family]["digit_accuracy"],
        "t moved by do(i)": entry["do(intensity)"][family]["thickness_mae"],
        "i moved by do(digit)": entry["do(digit)"][family]["intensity_mae"],
    }


def this_command() -> str:
    return shlex.join(["python", "benchmarks/tune_scm_guidance.py", *sys.argv[1:]])


def markdown(results: list[dict], num_images: int) -> str:
    """The ranked settings as a table, best first."""
    lines = [
        f"Measured with `{this_command()}` on the first {num_images} images of the held-out split, benchmark judges "
        "(eval mode); objective = mean of the last five columns, each divided by its target; best first.",
        "",
    ]
    header = [
        "classifier-free w",
        "anti-causal s",
        "thickness MAE under do(t)",
        "intensity MAE under do(i)",
        "digit error under do(digit)",
        "thickness moved by do(i)",
        "intensity moved by do(digit)",
        "objective",
    ]
    rows = []
    for entry in results:
        scales = [", ".join(f"{k} {v:g}" for k, v in entry[key].items()) for key in ("cfg_scale", "guidance_scale")]
        rows.append([*scales, *(f"{value:.3f}" for value in entry["summary"].values()), f"{entry['objective']:.2f}"])
    lines.append(markdown_table(header, rows, [False, False] + [True] * 6))
    return "\n".join(lines) + "\n"


@torch.no_grad()
def main(args: argparse.Namespace):
    pipe = hub.load_pipeline(
        args.model, args.device or ("cuda" if torch.cuda.is_available() else "cpu"), **config_options(args)
    )
    pipe.set_progress_bar_config(disable=True)
    graph = pipe.causal_graph
    dataset = load_image_dataset(train_data_dir=args.data_dir or shipped_data("morphomnist"))
    rows = heldout_rows(pipe.config._name_or_path, dataset, args.num_samples)
    oracle = (
        DigitOracle.from_pretrained(args.oracle or shipped_checkpoint("morphomnist-oracle")).eval().to(pipe.device)
    )
    judges = BenchmarkJudges.from_pretrained().to(pipe.device)
    images = (pipe.preprocess([row["image"] for row in rows]) + 1) / 2
    factual = graph.data_values(rows)
    pool = {name: np.asarray(dataset[name]) for name in ("thickness", "intensity")}
    requests = intervention_requests(graph, factual, pool, args.seed)
    results = []
    for cfg in grid(args.cfg_scale):
        abduction = pipe.abduct(
            images,
            factual,
            num_inference_steps=args.steps,
            abduction_refinement_steps=args.refinement,
            cfg_scale=cfg,
            integrator=args.integrator,
        )
        for guidance in grid(args.guidance_scale):
            entry = {"cfg_scale": pipe.cfg_scales(cfg), "guidance_scale": pipe.guidance_scales(guidance)}
            for variable in PARENTS:
                expected = requests[variable]
                counterfactuals = pipe.intervene(
                    abduction, {p: expected[p] for p in graph.image_parents}, guidance_scale=guidance
                )
                entry[f"do({variable})"] = judge(counterfactuals, expected, oracle, judges)
            entry["summary"] = summary(entry)
            entry["objective"] = float(np.mean([entry["summary"][k] / target for k, target in TARGETS.items()]))
            results.append(entry)
            shown = ", ".join(f"{k} {v:.3f}" for k, v in entry["summary"].items())
            print(f"cfg {cfg} guidance {guidance}: {shown}; objective {entry['objective']:.2f}", flush=True)
    results.sort(key=lambda entry: entry["objective"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"num_images": len(rows), "results": results}, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(markdown(results, len(rows)))
    print(f"best: cfg {results[0]['cfg_scale']}, guidance {results[0]['guidance_scale']} (wrote {args.out})")
    if args.save_defaults:
        cfg = results[0]["cfg_scale"] if pipe.mechanism == "conditional" else None
        hub.write_defaults(args.model, this_command(), results[0]["guidance_scale"], cfg)


if __name__ == "__main__":
    main(parse_args())
