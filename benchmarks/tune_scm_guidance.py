"""Choose the guidance scale of each parent of a Morpho-MNIST pipeline by measurement, on a tuning subset.

    python benchmarks/tune_scm_guidance.py --model checkpoints/diffscm-morphomnist \\
        --data-dir ../shared/data/morphomnist --num-samples 100 --thickness 1 3 --intensity 2 4 --digit 8 16

Uses the first --num-samples images of the model's held-out split (evaluate the chosen scales on the rest with
`diffscm evaluate-scm --skip N`). One abduction serves every setting. For each combination of scales it scores
do(thickness), do(intensity) and do(digit) by morphometrics and the oracle, and ranks the settings by the benchmark's
three effectiveness numbers, each divided by its do-nothing baseline (the unchanged image).
"""

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from diffscm.cli import heldout_rows, load_pipeline, to_model_images
from diffscm.data import load_image_dataset
from diffscm.evaluation import DigitOracle
from diffscm.evaluation.morphomnist import benchmark_interventions, measure, score


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--oracle", required=True)
    parser.add_argument("--num-samples", type=int, default=100)
    for name in ("thickness", "intensity", "digit"):
        parser.add_argument(f"--{name}", type=float, nargs="+", required=True, help=f"Scales to try for {name}.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/evaluation-morphomnist-scm/tuning.json")
    return parser.parse_args(argv)


def objective(entry: dict) -> float:
    """Mean of the three effectiveness errors relative to leaving the image unchanged (lower is better)."""
    return float(
        np.mean(
            [
                entry["do(thickness)"]["thickness_mae"] / entry["do(thickness)"]["unchanged"]["thickness_mae"],
                entry["do(intensity)"]["intensity_mae"] / entry["do(intensity)"]["unchanged"]["intensity_mae"],
                (1 - entry["do(digit)"]["digit_accuracy"]) / (1 - entry["do(digit)"]["unchanged"]["digit_accuracy"]),
            ]
        )
    )


@torch.no_grad()
def main(args: argparse.Namespace):
    args.quiet = True
    pipe = load_pipeline(args.model, args)
    graph = pipe.causal_graph
    rows = heldout_rows(pipe, load_image_dataset(train_data_dir=args.data_dir), args.num_samples)
    oracle = DigitOracle.from_pretrained(args.oracle).eval()
    images = to_model_images(pipe, [row["image"] for row in rows])
    factual = graph.data_values(rows)
    abduction = pipe.abduct(images, {name: factual[name] for name in graph.image_parents})
    unchanged = measure(pipe, oracle, images)
    requests = {
        variable: (expected, score(unchanged, expected))
        for variable, expected in benchmark_interventions(graph, factual, args.seed).items()
    }
    results = []
    for scales in itertools.product(args.thickness, args.intensity, args.digit):
        guidance = dict(zip(("thickness", "intensity", "digit"), scales, strict=True))
        entry = {"guidance_scale": guidance}
        for variable, (expected, baseline) in requests.items():
            values = {name: expected[name] for name in graph.image_parents}
            counterfactuals = pipe.intervene(abduction, values, guidance_scale=guidance)
            scores = score(measure(pipe, oracle, counterfactuals), expected)
            entry[f"do({variable})"] = scores | {"unchanged": baseline}
        entry["objective"] = objective(entry)
        results.append(entry)
        print(
            f"{guidance}: t-MAE {entry['do(thickness)']['thickness_mae']:.3f}, "
            f"i-MAE {entry['do(intensity)']['intensity_mae']:.2f}, acc {entry['do(digit)']['digit_accuracy']:.3f}, "
            f"objective {entry['objective']:.3f}",
            flush=True,
        )
    results.sort(key=lambda entry: entry["objective"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"num_images": len(rows), "results": results}, indent=2) + "\n")
    print(f"best: {results[0]['guidance_scale']} (wrote {args.out})")


if __name__ == "__main__":
    main(parse_args())
