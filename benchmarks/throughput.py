"""Counterfactuals per second, and what they cost in quality: batch size, precision, torch.compile and the chain.

    python benchmarks/throughput.py --num-samples 200 --out docs/throughput.md [--device cuda]

On the shipped MNIST pipeline and its held-out digits, each with a random other target digit, judged by the
independent oracle:

1. throughput (counterfactuals per second, one abduction and one intervention each) against batch size, weights'
   precision (the abduction stays in float32) and `torch.compile` of the UNet, at the pipeline's defaults;
2. the Pareto curve of the chain: DDIM steps, abduction refinement passes, how many targets share one abduction
   (STEPS:K[:TARGETS[:SCALE]], TARGETS other digits per image, all 9 for "9") and the guidance scale, against UNet
   evaluations, seconds, flip rate and the null intervention's L1 (how exactly the factual comes back);
3. in the same run, the official Diff-SCM code's setting (100 steps, abduction to 0.75 of the chain, scale 1) and
   the paper's (1000 + 1000 steps), for the ratios;
4. the physical limit: a UNet pass's GFLOP per image (`torch.utils.flop_counter`) times each chain's passes per
   counterfactual, against this machine's measured matrix-multiply peak (GFLOP/s, float32 and bfloat16): the most
   counterfactuals per second that chain could reach, and how much of it the measured rate is.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from diffscm import hub
from diffscm.data import BUNDLED_MNIST, heldout_rows, load_bundled_mnist
from diffscm.evaluation import DigitOracle
from diffscm.evaluation.metrics import count_calls, grey_level_l1, oracle_predictions
from diffscm.folder_format import INTEGRATORS
from diffscm.options import describe_machine
from diffscm.paths import shipped_checkpoint
from diffscm.tables import markdown_table


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Default: the shipped MNIST pipeline.")
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 200])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true", help="Also time torch.compile of the UNet.")
    parser.add_argument(
        "--chains",
        nargs="+",
        default=["10:0", "10:1", "15:1", "20:1", "25:1", "25:3", "10:1:9", "25:1:9", "bdia/10:0", "bdia/25:0"],
        help="[INTEGRATOR/]STEPS:K[:TARGETS[:SCALE]] settings of the chain (TARGETS counterfactuals share one "
        "abduction; INTEGRATOR ddim, bdia or residual, default ddim).",
    )
    parser.add_argument("--paper", action="store_true", help="Also run the paper's 1000 + 1000 steps (slow).")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--out", default="docs/throughput.md")
    args = parser.parse_args(argv)
    if "float32" not in args.dtypes:
        parser.error("--dtypes must include float32 (the chain and the references run in it).")
    try:
        args.chains = [parse_chain(chain) for chain in args.chains]  # refused before any timing starts
    except ValueError as error:
        parser.error(str(error))
    return args


def run(pipe, images, labels, targets, steps, refinement, batch_size, strength=1.0, scale=None, integrator=None):
    """One abduction per image and one intervention per target (`targets` is (N,) or (N, k): k share the
    abduction), in batches of images: seconds, NFE and null L1 per counterfactual."""
    parent = pipe.single_categorical_parent()
    targets = targets.view(len(images), -1)
    outputs, abductions, seconds = [], [], 0.0
    with count_calls(pipe.unet) as calls:
        for start in range(0, len(images), batch_size):
            chunk = slice(start, start + batch_size)
            _synchronize(pipe.device)
            started = time.perf_counter()
            abductions.append(
                pipe.abduct(
                    images[chunk],
                    {parent: labels[chunk]},
                    num_inference_steps=steps,
                    strength=strength,
                    abduction_refinement_steps=refinement,
                    integrator=integrator,
                )
            )
            shared = abductions[-1].repeat_interleave(targets.shape[1])
            outputs.append(pipe.intervene(shared, targets[chunk].flatten(), guidance_scale=scale).cpu())
            _synchronize(pipe.device)
            seconds += time.perf_counter() - started
    counterfactuals = torch.cat(outputs)
    null = torch.cat([pipe.intervene(abduction).cpu() for abduction in abductions])  # not timed, not counted
    return {
        "seconds_per_counterfactual": seconds / len(counterfactuals),
        "counterfactuals_per_second": len(counterfactuals) / seconds,
        "nfe_per_counterfactual": calls["samples"] / len(counterfactuals),
        "counterfactuals": counterfactuals,
        "targets": targets.flatten(),
        "null_l1": grey_level_l1(null, images),
    }


def gflop_per_pass(pipe, image: torch.Tensor, label: torch.Tensor) -> float:
    """GFLOP of one UNet pass (with the parent embedding) on one image, counted over a 2-step abduction."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, count_calls(pipe.unet) as calls:
        pipe.abduct(image, {pipe.single_categorical_parent(): label}, num_inference_steps=2,
                    abduction_refinement_steps=0, integrator="ddim")  # fmt: skip
    return counter.get_total_flops() / calls["samples"] / 1e9


def peak_gflops(dtype: str, device: torch.device, size: int = 2048, seconds: float = 3.0) -> float:
    """The machine's matrix-multiply rate in `dtype` (GFLOP/s): square products of `size` for about `seconds`."""
    a = torch.randn(size, size, device=device, dtype=getattr(torch, dtype))
    b, count = torch.randn_like(a), 0
    torch.mm(a, b)  # warm-up
    _synchronize(device)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        count += 1
        _synchronize(device)
    return 2 * size**3 * count / (time.perf_counter() - started) / 1e9


def other_targets(labels: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """(N, count): `count` distinct random digits other than each label (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.stack([torch.randperm(9, generator=generator)[:count] for _ in labels]) + 1
    return (labels.view(-1, 1) + offsets) % 10


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def flip_rate(oracle, entry: dict) -> float:
    return (oracle_predictions(oracle, entry["counterfactuals"]) == entry["targets"]).float().mean().item()


def parse_chain(text: str) -> tuple[str, int, int, int, float | None]:
    """ "[INTEGRATOR/]STEPS:K[:TARGETS[:SCALE]]" -> (integrator, steps, refinement, targets sharing one abduction,
    guidance scale or None); the integrator is ddim where not named."""
    integrator, _, text = text.rpartition("/")
    integrator = integrator or "ddim"
    if integrator not in INTEGRATORS:
        raise ValueError(f"--chains names the integrator {integrator!r}; one of {INTEGRATORS} is expected.")
    fields = text.split(":")
    try:
        if not 2 <= len(fields) <= 4:
            raise ValueError
        steps, refinement, targets = int(fields[0]), int(fields[1]), int(fields[2]) if len(fields) > 2 else 1
        scale = float(fields[3]) if len(fields) > 3 else None
    except ValueError:
        raise ValueError(f"--chains takes STEPS:K[:TARGETS[:SCALE]] (integers, then a scale), got {text!r}.") from None
    if not 1 <= targets <= 9:
        raise ValueError(f"TARGETS must be 1 to 9 (the other digits), got {targets} in {text!r}.")
    return integrator, steps, refinement, targets, scale


def main(args: argparse.Namespace):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    oracle = DigitOracle.from_pretrained(shipped_checkpoint("mnist-oracle")).eval().to(device)
    base = hub.load_pipeline(args.model, device)
    rows = heldout_rows(base.config._name_or_path, load_bundled_mnist(), args.num_samples, source=BUNDLED_MNIST)
    images = (base.preprocess([row["image"] for row in rows]) + 1) / 2
    labels = torch.tensor([row["label"] for row in rows])
    targets = other_targets(labels, 1)
    steps, refinement = base.config.num_inference_steps, base.config.abduction_refinement_steps
    result = {
        "machine": describe_machine(device),
        "command": shlex.join(["python", "benchmarks/throughput.py", *sys.argv[1:]]),
        "num_images": len(images),
        "throughput": [],
        "chains": [],
        "reference": {},
    }

    for dtype in args.dtypes:
        pipe = hub.load_pipeline(args.model, device, dtype)
        pipe.set_progress_bar_config(disable=True)
        for compiled in (False, True) if args.compile else (False,):
            if compiled:
                pipe.unet = torch.compile(pipe.unet)
            for batch_size in args.batch_sizes:
                run(
                    pipe, images[:batch_size], labels[:batch_size], targets[:batch_size], steps, refinement, batch_size
                )  # warm-up (and compilation)
                entry = run(pipe, images, labels, targets, steps, refinement, batch_size)
                row = {
                    "dtype": dtype,
                    "compiled": compiled,
                    "batch_size": batch_size,
                    "counterfactuals_per_second": entry["counterfactuals_per_second"],
                    "flip_rate": flip_rate(oracle, entry),
                    "null_l1": entry["null_l1"],
                }
                result["throughput"].append(row)
                print(json.dumps(row), flush=True)

    base.set_progress_bar_config(disable=True)
    eager = [row for row in result["throughput"] if row["dtype"] == "float32" and not row["compiled"]]
    batch = max(eager, key=lambda row: row["counterfactuals_per_second"])["batch_size"]
    result["chain_batch_size"] = batch
    for integrator, chain_steps, chain_refinement, shared, scale in args.chains:
        chain_targets = other_targets(labels, shared)
        entry = run(base, images, labels, chain_targets, chain_steps, chain_refinement, batch, 1.0, scale, integrator)
        row = {
            "integrator": integrator,
            "steps": chain_steps,
            "refinement": chain_refinement,
            "targets_per_abduction": shared,
            "guidance_scale": base.guidance_scales(scale),
            "nfe": entry["nfe_per_counterfactual"],
            "seconds_per_counterfactual": entry["seconds_per_counterfactual"],
            "flip_rate": flip_rate(oracle, entry),
            "null_l1": entry["null_l1"],
        }
        result["chains"].append(row)
        print(json.dumps(row), flush=True)
    references = {"official code: 100 steps, strength 0.75, scale 1": (100, 0, 0.75, 1.0)}
    if args.paper:
        references["paper: 1000 + 1000 steps"] = (1000, 0, 1.0, None)
    for name, (ref_steps, ref_refinement, strength, scale) in references.items():
        entry = run(base, images, labels, targets, ref_steps, ref_refinement, batch, strength, scale)
        result["reference"][name] = {
            "counterfactuals_per_second": entry["counterfactuals_per_second"],
            "flip_rate": flip_rate(oracle, entry),
        }
        print(name, json.dumps(result["reference"][name]), flush=True)

    result["gflop_per_pass"] = gflop_per_pass(base, images[:1], labels[:1])
    result["peak_gflops"] = {dtype: peak_gflops(dtype, base.device) for dtype in args.dtypes}
    print("limit", json.dumps({k: result[k] for k in ("gflop_per_pass", "peak_gflops")}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out).write_text(markdown(result))
    print(Path(args.out).read_text())


def chain_limit(result: dict, passes: float) -> float:
    """The most counterfactuals per second a chain of `passes` UNet passes each could reach at the float32 peak."""
    return result["peak_gflops"]["float32"] / (passes * result["gflop_per_pass"])


def markdown(result: dict) -> str:
    default = next(
        row
        for row in result["throughput"]
        if row["dtype"] == "float32" and not row["compiled"] and row["batch_size"] == result["chain_batch_size"]
    )
    lines = [
        "# Throughput",
        "",
        f"Measured on {result['machine']} with `{result['command']}`: {result['num_images']} held-out "
        "bundled MNIST digits, each with a random other target digit; flip rate by the independent oracle; null L1 in "
        "grey levels (0-255).",
        "",
    ]
    rows = [
        [
            row["dtype"],
            "yes" if row["compiled"] else "no",
            row["batch_size"],
            f"{row['counterfactuals_per_second']:.1f}",
            f"{row['flip_rate']:.3f}",
            f"{row['null_l1']:.2f}",
        ]
        for row in result["throughput"]
    ]
    header = ["weights", "torch.compile", "batch", "counterfactuals / s", "flip rate", "null L1"]
    lines.append(markdown_table(header, rows, [False, False] + [True] * 4))
    lines += ["", f"The chain (float32, batches of {result['chain_batch_size']} images, the fastest above):", ""]
    rows = []
    for row in result["chains"]:
        scales = ", ".join(f"{name} {scale:g}" for name, scale in row["guidance_scale"].items())
        rate, limit = 1 / row["seconds_per_counterfactual"], chain_limit(result, row["nfe"])
        rows.append(
            [
                row.get("integrator", "ddim"),
                row["steps"],
                row["refinement"],
                row["targets_per_abduction"],
                scales,
                f"{row['nfe']:.1f}",
                f"{row['seconds_per_counterfactual']:.4f}",
                f"{rate:.1f}",
                f"{limit:.1f}",
                f"{rate / limit:.0%}",
                f"{row['flip_rate']:.3f}",
                f"{row['null_l1']:.2f}",
            ]
        )
    header = [
        "integrator",
        "steps",
        "refinement K",
        "targets per abduction",
        "guidance",
        "UNet NFE / cf",
        "s / cf",
        "cf / s",
        "limit cf / s",
        "of the limit",
        "flip rate",
        "null L1",
    ]
    lines.append(markdown_table(header, rows, [False, True, True, True, False] + [True] * 7))
    peaks = ", ".join(f"{gflops:.0f} GFLOP/s in {dtype}" for dtype, gflops in result["peak_gflops"].items())
    lines += [
        "",
        f"The physical limit: a UNet pass costs {result['gflop_per_pass']:.3f} GFLOP per image (its parent embedding "
        f"included), and this machine multiplies square 2048 matrices at {peaks} in the same run. A chain of n "
        "passes per counterfactual can reach at most peak / (n x GFLOP per pass) counterfactuals per second "
        "(float32 peak; the anti-causal predictor's gradients and the oracle are not counted, so the true ceiling "
        "is lower still). Convolutions at 28 x 28 reach a fraction of a matrix product's rate: `of the limit` says "
        "how much.",
    ]
    lines += ["", "In the same run:", ""]
    for name, row in result["reference"].items():
        ratio = default["counterfactuals_per_second"] / row["counterfactuals_per_second"]
        lines.append(
            f"- {name}: {row['counterfactuals_per_second']:.2f} counterfactuals / s, flip rate "
            f"{row['flip_rate']:.3f}; the defaults are {ratio:.1f}x faster."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(parse_args())
