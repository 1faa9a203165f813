"""The benchmark's composition L1 (do(parents = factual values), padded 32x32, grey levels) of the shipped conditional
Morpho-MNIST pipeline on held-out digits, against the abduction's refinement passes per step, with the pipeline's
Anderson-accelerated fixed point and with the plain iteration x_t <- step^-1(x_next, eps(x_t, t)) it replaced.

    python benchmarks/abduction_acceleration.py --num-samples 50 --refinements 0 1 2 3 --cycles 1
"""

import argparse
import contextlib
import time
from unittest import mock

import torch

from diffscm import hub
from diffscm.data import heldout_rows, load_image_dataset
from diffscm.evaluation.morphomnist import composition
from diffscm.folder_format import unet_passes
from diffscm.paths import shipped_checkpoint, shipped_data
from diffscm.tables import markdown_table

SOLVERS = {"Anderson (the pipeline's)": None, "plain iteration": lambda tried, mapped: mapped[-1]}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Default: the shipped diffscm-morphomnist-conditional.")
    parser.add_argument("--num-samples", type=int, default=50)
    parser.add_argument("--skip", type=int, default=100, help="Held-out digits skipped first (as evaluate-scm).")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the pipeline's).")
    parser.add_argument("--refinements", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--cycles", type=int, default=1, help="Composition cycles; 1 and this many are reported.")
    args = parser.parse_args()
    if args.num_samples < 1 or args.skip < 0 or args.cycles < 1 or min(args.refinements) < 0:
        parser.error("--num-samples and --cycles must be >= 1, --skip and --refinements >= 0.")
    return args


def main(args):
    pipe = hub.load_pipeline(args.model or shipped_checkpoint("diffscm-morphomnist-conditional"), "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    rows = heldout_rows(
        pipe.config._name_or_path, load_image_dataset(train_data_dir=shipped_data("morphomnist")), args.num_samples,
        skip=args.skip,
    )  # fmt: skip
    images = (pipe.preprocess([row["image"] for row in rows]) + 1) / 2
    factual = pipe.causal_graph.data_values(rows)
    steps = args.steps or pipe.config.num_inference_steps
    table = []
    for refinements in args.refinements:
        for solver, mix in SOLVERS.items():
            if refinements == 0 and mix is not None:
                continue  # one pass per step: nothing to accelerate, the two solvers are the same
            start = time.perf_counter()
            patch = mock.patch(f"{type(pipe).__module__}.anderson_mix", mix) if mix else contextlib.nullcontext()
            with patch:
                result = composition(pipe, images, factual, args.cycles, num_inference_steps=steps,
                                     abduction_refinement_steps=refinements, cfg_scale=1.0,
                                     integrator="ddim")  # fmt: skip
            cells = [f"{result[f'cycles_{cycles}']['benchmark_l1']:.3f}" for cycles in sorted({1, args.cycles})]
            nfe = unet_passes(steps, refinements, "ddim")
            table.append([solver if refinements else "either", refinements, nfe, *cells])
            table[-1].append(f"{time.perf_counter() - start:.0f}")
    cycles = [f"composition, {n} cycle{'s' * (n > 1)}" for n in sorted({1, args.cycles})]
    print(f"{len(rows)} held-out digits of {pipe.config._name_or_path}, {steps} DDIM steps, cfg 1:\n")
    print(markdown_table(["fixed point", "refinement passes", "UNet evaluations", *cycles, "seconds"], table))


if __name__ == "__main__":
    with torch.no_grad():
        main(parse_args())
