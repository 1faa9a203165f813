"""How well an image mechanism follows its parents, against the training images it has seen: the scaling curve.

    python benchmarks/generation_fidelity.py --pipeline checkpoints/diffscm-morphomnist-conditional \\
        --runs outputs/export-1000 outputs/export-4000 --num-samples 200 --out docs/scaling-morphomnist.md

Each run is a `train_unet.py` output folder with a conditional `unet/` and `parent_embedding/` (a finished run, or a
checkpoint exported by re-running the script with `--resume_from_checkpoint DIR/checkpoint-N --max_train_steps N`).
Its mechanism draws one image from fresh noise under the parents of each of the --pipeline's held-out digits (no
abduction, no anti-causal guidance; 25 DDIM steps) and the judges read them against those parents: the Morpho-MNIST
benchmark's own judges and morphometrics for a thickness / intensity / digit graph, the independent oracle for a
digit-only one. The --pipeline itself is the first row, and the real held-out digits the floor.
"""

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel

from diffscm import CausalGraph, DiffSCMPipeline, ParentEmbedding, hub
from diffscm.data import BUNDLED_MNIST, heldout_rows, load_bundled_mnist, load_image_dataset
from diffscm.evaluation import DigitOracle, mnist, morphomnist
from diffscm.evaluation.benchmark_judges import BenchmarkJudges
from diffscm.paths import shipped_checkpoint, shipped_data
from diffscm.tables import markdown_table


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="The pipeline whose held-out digits and graph are used.")
    parser.add_argument("--runs", nargs="*", default=[], help="train_unet.py output folders, in order.")
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="Classifier-free guidance of every parent.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="The Markdown table (a JSON beside it).")
    parser.add_argument(
        "--extend",
        default=None,
        help="An earlier measurement's JSON by the same protocol: its rows come first, so that the curve goes on "
        "across sessions (the runs it measured need not exist any more).",
    )
    args = parser.parse_args(argv)
    if args.num_samples < 2:
        parser.error("--num-samples must be >= 2.")
    args.previous = json.loads(Path(args.extend).read_text()) if args.extend else None
    if args.previous:
        previous = args.previous
        if (previous["num_samples"], previous["cfg_scale"], previous.get("seed", 0)) != (
            args.num_samples, args.cfg_scale, args.seed
        ):  # fmt: skip
            parser.error(f"{args.extend} was measured with other --num-samples, --cfg-scale or --seed.")
    for run in args.runs:
        if not (Path(run) / "unet").is_dir() or not (Path(run) / "parent_embedding").is_dir():
            parser.error(f"{run} holds no conditional unet/ and parent_embedding/ (export the checkpoint first).")
    return args


def run_pipeline(run: Path, graph: CausalGraph) -> DiffSCMPipeline:
    """A classifier-free pipeline of one conditional train_unet.py run, for drawing from its mechanism."""
    unet = UNet2DModel.from_pretrained(run, subfolder="unet")
    embedding = ParentEmbedding.from_pretrained(run, subfolder="parent_embedding")
    scheduler = DDIMScheduler.from_pretrained(run, subfolder="scheduler")
    pipe = DiffSCMPipeline(unet, scheduler, parent_embedding=embedding, causal_graph=graph.to_config())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images_seen(folder: Path) -> int | None:
    """The training images behind a run (`training_args.json`) or a pipeline folder (`training.json`)."""
    if (folder / "training_args.json").is_file():
        return json.loads((folder / "training_args.json").read_text()).get("images_seen")
    if (folder / "training.json").is_file():
        return json.loads((folder / "training.json").read_text()).get("unet_images_seen")
    return None


def main(args: argparse.Namespace):
    base = hub.load_pipeline(args.pipeline)
    base.set_progress_bar_config(disable=True)
    graph = base.causal_graph
    morpho = set(graph.image_parents) == set(morphomnist.PARENTS)
    if morpho:
        rows = heldout_rows(
            args.pipeline, load_image_dataset(train_data_dir=shipped_data("morphomnist")), args.num_samples
        )
        oracle = DigitOracle.from_pretrained(shipped_checkpoint("morphomnist-oracle")).eval()
        judges, factual = BenchmarkJudges.from_pretrained(None), graph.data_values(rows)
        real = morphomnist.judge((base.preprocess([row["image"] for row in rows]) + 1) / 2, factual, oracle, judges)
    else:
        rows = heldout_rows(args.pipeline, load_bundled_mnist(), args.num_samples, source=BUNDLED_MNIST)
        oracle = DigitOracle.from_pretrained(shipped_checkpoint("mnist-oracle")).eval()
        labels = torch.tensor([row["label"] for row in rows])
    table = []
    for name, pipe in [(args.pipeline, base)] + [(run, run_pipeline(Path(run), graph)) for run in args.runs]:
        if morpho:
            read = morphomnist.generation_fidelity(pipe, oracle, factual, judges, (args.cfg_scale,), seed=args.seed)
            scores = next(iter(read.values()))
        else:
            accuracy = next(
                iter(mnist.generation_fidelity(pipe, oracle, labels, (args.cfg_scale,), seed=args.seed).values())
            )
            scores = {"oracle": {"digit_accuracy": accuracy}}
        table.append({"run": name, "images_seen": images_seen(Path(name)), "scores": scores})
        print(json.dumps(table[-1]))
    commands = ["python benchmarks/generation_fidelity.py " + shlex.join(sys.argv[1:])]
    if args.previous:
        previous = args.previous
        commands, table = previous.get("commands", [previous.get("command")]) + commands, previous["rows"] + table
    record = {"commands": commands, "num_samples": len(rows), "cfg_scale": args.cfg_scale, "seed": args.seed}
    record["rows"] = table
    if morpho:
        record["real_heldout_digits"] = real
    Path(args.out).with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    Path(args.out).write_text(report(record, morpho))
    print(f"Wrote {args.out}")


def report(record: dict, morpho: bool) -> str:
    family = "benchmark" if morpho else "oracle"
    header = ["run", "training images seen", "log10"]
    header += ["thickness MAE, px", "intensity MAE", "digit accuracy"] if morpho else ["digit accuracy (oracle)"]
    rows = []
    for row in record["rows"] + ([{"run": "real held-out digits", "images_seen": None,
                                    "scores": record["real_heldout_digits"]}] if morpho else []):  # fmt: skip
        seen = row["images_seen"]
        scores = row["scores"][family]
        cells = [f"`{row['run']}`", f"{seen:,}" if seen else "-", f"{math.log10(seen):.2f}" if seen else "-"]
        if morpho:
            cells += [f"{scores['thickness_mae']:.3f}", f"{scores['intensity_mae']:.2f}"]
        rows.append(cells + [f"{scores['digit_accuracy']:.3f}"])
    measured = ", then ".join(f"`{command}`" for command in record["commands"])
    return (
        f"Generation fidelity of the image mechanism: one image from fresh noise per held-out digit "
        f"({record['num_samples']} digits), under its parents, classifier-free guidance {record['cfg_scale']:g}, no "
        f"anti-causal guidance, 25 DDIM steps; read by the {'benchmark' if morpho else 'independent oracle'}'s "
        f"judges. Measured with {measured}.\n\n" + markdown_table(header, rows) + "\n"
    )


if __name__ == "__main__":
    main(parse_args())
