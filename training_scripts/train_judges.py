"""Train independent judges for a data set and its causal graph: a clean-image predictor of every parent of the image.

    accelerate launch training_scripts/train_judges.py --dataset_name data/colour-mnist \\
        --causal_graph docs/graphs/colour-mnist.json --num_channels 3 --output_dir outputs/colour-mnist-judges \\
        --export_dir checkpoints/colour-mnist-judges

The judges (`diffscm.evaluation.GraphJudges`) differ from the pipeline's anti-causal predictor in architecture, view
(clean images) and seed; `diffscm evaluate --judges` scores counterfactuals with them. They hold out the same seeded
split as the pipeline's training runs (same --holdout_size and --split_seed) and record their own error on those
real held-out images in `judges.json`: the floor below which no counterfactual's score can be read.
"""

import argparse
from pathlib import Path

import torch

from diffscm import CausalGraph, hub, model_cards, training
from diffscm.data import images_to_tensor
from diffscm.evaluation import GraphJudges
from diffscm.evaluation.judges import judge_errors

SCRIPT = "train_judges.py"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_training_args(parser)
    parser.add_argument("--causal_graph", required=True, help="'morphomnist', 'digit' or a JSON graph file.")
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument(
        "--augment_degrees",
        type=float,
        default=0.0,
        help="Random rotations, scalings and shifts of this range (0: none; leave it 0 where they change a parent).",
    )
    parser.set_defaults(seed=7)  # never the seed of the pipeline's predictor
    args = training.parse_judge_args(parser, argv, "judges")
    try:
        CausalGraph.load(args.causal_graph)
    except (OSError, ValueError, TypeError) as error:
        parser.error(f"--causal_graph {args.causal_graph!r}: {error}")
    return args


def main(args: argparse.Namespace):
    accelerator = training.make_accelerator(args)
    split, split_record = training.load_split(args)
    graph, _ = training.load_graph(args, split)
    dataloader = training.make_dataloader(split["train"], args, values=training.parent_values(graph, split["train"]))
    judges = GraphJudges(graph.parent_specs(), args.resolution, args.num_channels, tuple(args.channels), args.dropout)
    judges, optimizer, dataloader, lr_scheduler, ema = training.prepare_model(accelerator, judges, dataloader, args)
    training.start_run(accelerator, args, "train_judges", split_record)

    def compute_loss(model, batch):
        images = training.augmented_images(batch, args.augment_degrees)
        return accelerator.unwrap_model(model).loss(model(images), training.batch_values(batch))

    run = training.train(accelerator, args, judges, optimizer, lr_scheduler, dataloader, compute_loss, ema)
    if accelerator.is_main_process:
        final = training.trained_model(accelerator, judges, ema)
        heldout = split["heldout"] if len(split["heldout"]) else split["train"]
        images = (images_to_tensor(heldout["image"], args.num_channels, args.resolution) + 1) / 2
        errors = judge_errors(final.predict(images), training.parent_values(graph, heldout), graph.parent_specs())
        training.record_run(args, SCRIPT, *run)
        final.save_pretrained(args.export_dir)
        commands = [
            *hub.data_commands(split_record),
            training.read_json(Path(args.output_dir) / "training_args.json")["command"],
        ]
        command = "\n".join(commands)  # the data it was trained on, where a command made it, then the training
        record = {"heldout": errors, "split": split_record, "command": command, "causal_graph": graph.to_config()}
        training.write_json(Path(args.export_dir) / "judges.json", record)
        model_cards.write_judges_card(args.export_dir)
        where = "held-out" if len(split["heldout"]) else "training (no held-out split)"
        print(f"Judges' own error on {len(heldout)} real {where} images: {errors}")
    accelerator.end_training()


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = True
    training.run_script(main, parse_args)
