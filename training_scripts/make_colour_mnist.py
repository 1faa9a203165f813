"""Write Colour-MNIST (digit -> hue -> image) as a standard imagefolder with `metadata.csv`.

    python training_scripts/make_colour_mnist.py --output_dir data/colour-mnist

Each digit of the source (by default the 5,000 bundled MNIST digits) is coloured with a hue drawn from its own band,
N(digit / 10 + 0.05, 0.05) clipped to [0, 1], after Monteiro et al. (ICLR 2023); `diffscm.colour_mnist` says how.
`metadata.csv` holds `file_name`, `digit` (the class names zero .. nine) and `hue`; `docs/graphs/colour-mnist.json`
is its causal graph.
"""

import argparse
import shlex
import sys
from pathlib import Path

import datasets

from diffscm import training
from diffscm.colour_mnist import make_colour_mnist, save_imagefolder
from diffscm.data import load_image_dataset, split_dataset


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None, help="'mnist-bundled' (the default).")
    parser.add_argument("--dataset_name", default=None, help="A data set with image and integer label columns.")
    parser.add_argument(
        "--distribution",
        default="data",
        choices=("data", "independent"),
        help="Hue from the digit's band (the data), or uniform whatever the digit: the unconfounded data to train "
        "judges on, which could otherwise read the digit from its colour.",
    )
    parser.add_argument("--variants", type=int, default=1, help="Coloured copies of every digit.")
    parser.add_argument(
        "--exclude_heldout",
        action="store_true",
        help="Leave out the digits that the training scripts hold out (their default split, --holdout_size and "
        "--split_seed): extra training data (train_unet.py --extra_train_data_dir) must never hold them.",
    )
    parser.add_argument("--holdout_size", type=float, default=None, help="As the training scripts' (default: theirs).")
    parser.add_argument("--split_seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    if args.variants < 1:
        parser.error(f"--variants must be >= 1, got {args.variants}.")
    if Path(args.output_dir).exists() and any(Path(args.output_dir).iterdir()):
        parser.error(f"--output_dir {args.output_dir!r} is not empty; choose a new folder.")
    return args


def main(args: argparse.Namespace):
    source = load_image_dataset(args.dataset, args.dataset_name)
    if args.exclude_heldout:
        holdout = int(args.holdout_size) if args.holdout_size and args.holdout_size >= 1 else args.holdout_size
        source = split_dataset(source, holdout, seed=args.split_seed)["train"].sort("source_index")
    copies = [
        make_colour_mnist(source, seed=args.seed + k, distribution=args.distribution) for k in range(args.variants)
    ]
    coloured = datasets.concatenate_datasets(copies)
    save_imagefolder(coloured, args.output_dir)
    command = "python training_scripts/make_colour_mnist.py " + shlex.join(sys.argv[1:])
    training.write_json(Path(args.output_dir) / "colour_mnist.json", {"command": command, "num_images": len(coloured)})
    print(f"Wrote {len(coloured)} coloured digits to {args.output_dir}")


if __name__ == "__main__":
    training.run_script(main, parse_args)
