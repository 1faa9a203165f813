"""Train a 🤗 transformers image classifier from scratch on clean digits: the classifier that diffscm explains.

    accelerate launch training_scripts/train_image_classifier.py --dataset mnist-bundled \\
        --output_dir outputs/mnist-vit --export_dir checkpoints/mnist-vit-classifier

A ViT (or ConvNeXt-V2) built from its config, since no Hub weights can be downloaded here; saved with
`save_pretrained` together with its image processor, so `AutoModelForImageClassification` and `AutoImageProcessor`
load it. It holds out the same seeded split as the pipelines and reports its held-out accuracy.
"""

import argparse

import torch.nn.functional as F
from transformers import (
    ConvNextImageProcessor,
    ConvNextV2Config,
    ConvNextV2ForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from diffscm import model_cards, training


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_training_args(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--model_type", default="vit", choices=("vit", "convnextv2"))
    model.add_argument("--hidden_size", type=int, default=64, help="ViT width (ConvNeXt-V2: first stage width).")
    model.add_argument("--num_hidden_layers", type=int, default=4)
    model.add_argument("--num_attention_heads", type=int, default=4)
    model.add_argument("--patch_size", type=int, default=4)
    model.add_argument("--augment_degrees", type=float, default=10.0, help="Random rotation range (0: none).")
    return training.parse_judge_args(parser, argv, "image_classifier")


def build(args: argparse.Namespace, num_labels: int):
    """The classifier and its image processor (resize to the training resolution, [0, 1] -> [-1, 1])."""
    labels = {"id2label": {i: str(i) for i in range(num_labels)}, "label2id": {str(i): i for i in range(num_labels)}}
    size, mean, std = args.resolution, [0.5] * args.num_channels, [0.5] * args.num_channels
    if args.model_type == "vit":
        config = ViTConfig(
            image_size=size, patch_size=args.patch_size, num_channels=args.num_channels, hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
            intermediate_size=2 * args.hidden_size, num_labels=num_labels, **labels,
        )  # fmt: skip
        processor = ViTImageProcessor(size={"height": size, "width": size}, image_mean=mean, image_std=std)
        return ViTForImageClassification(config), processor
    widths = [args.hidden_size * 2**i for i in range(3)]
    config = ConvNextV2Config(
        num_channels=args.num_channels, patch_size=2, hidden_sizes=widths, depths=[2, 2, 2], image_size=size,
        num_labels=num_labels, **labels,
    )  # fmt: skip
    processor = ConvNextImageProcessor(size={"shortest_edge": size}, crop_pct=1.0, image_mean=mean, image_std=std)
    return ConvNextV2ForImageClassification(config), processor


def main(args: argparse.Namespace):
    accelerator = training.make_accelerator(args)
    split, split_record = training.load_split(args)
    dataloader = training.make_dataloader(split["train"], args)  # pixel_values in [-1, 1]: the processor's output
    classifier, processor = build(args, training.num_labels(split["train"]))
    classifier, optimizer, dataloader, lr_scheduler, ema = training.prepare_model(
        accelerator, classifier, dataloader, args
    )
    training.start_run(accelerator, args, "train_image_classifier", split_record)

    def compute_loss(model, batch):
        images = training.augmented_images(batch, args.augment_degrees)
        return F.cross_entropy(model(pixel_values=images).logits.float(), batch["labels"])

    run = training.train(accelerator, args, classifier, optimizer, lr_scheduler, dataloader, compute_loss, ema)

    def write_card(export_dir: str):
        processor.save_pretrained(export_dir)
        model_cards.write_image_classifier_card(export_dir)

    training.export_judge(
        accelerator, args, classifier, ema, split, split_record, "train_image_classifier.py", run, "heldout_accuracy",
        lambda model, batches: training.accuracy(lambda x: model(pixel_values=x).logits, batches, accelerator.device),
        write_card, "held-out accuracy",
    )  # fmt: skip


if __name__ == "__main__":
    training.run_script(main, parse_args)
