"""Train the independent oracle that judges counterfactuals (never guides them) on clean, augmented images.

    accelerate launch training_scripts/train_oracle.py --dataset mnist-bundled --output_dir outputs/mnist-oracle \\
        --export_dir checkpoints/mnist-oracle

It holds out the same seeded split as the pipeline's training runs and reports its own held-out accuracy.
"""

import argparse
import logging

import torch.nn.functional as F

from diffscm import model_cards, training
from diffscm.evaluation import DigitOracle

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_training_args(parser)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument(
        "--augment_degrees", type=float, default=10.0, help="Random rotation range (0: no augmentation)."
    )
    return training.parse_judge_args(parser, argv, "oracle")


def main(args: argparse.Namespace):
    accelerator = training.make_accelerator(args)
    split, split_record = training.load_split(args)
    dataloader = training.make_dataloader(split["train"], args)
    oracle = DigitOracle(
        sample_size=args.resolution,
        in_channels=args.num_channels,
        num_classes=training.num_labels(split["train"]),
        channels=tuple(args.channels),
        dropout=args.dropout,
    )
    oracle, optimizer, dataloader, lr_scheduler, ema = training.prepare_model(accelerator, oracle, dataloader, args)
    training.start_run(accelerator, args, "train_oracle", split_record)

    def compute_loss(model, batch):
        images = training.augmented_images(batch, args.augment_degrees)
        return F.cross_entropy(model(images).float(), batch["labels"])

    run = training.train(accelerator, args, oracle, optimizer, lr_scheduler, dataloader, compute_loss, ema)
    training.export_judge(
        accelerator, args, oracle, ema, split, split_record, "train_oracle.py", run, "heldout_accuracy",
        lambda model, batches: training.accuracy(model, batches, accelerator.device), model_cards.write_oracle_card,
        "held-out accuracy of the oracle",
    )  # fmt: skip


if __name__ == "__main__":
    training.run_script(main, parse_args)
