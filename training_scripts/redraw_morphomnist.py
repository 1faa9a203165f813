"""Make Morpho-MNIST-style training digits from other digits with Morpho-MNIST's own generative process.

    python training_scripts/redraw_morphomnist.py --variants 4 --output_dir outputs/mnist-redrawn

Every digit is re-drawn `--variants` times at a thickness t = 0.5 + Gamma(10, rate 5) (dilation or erosion at 16x
resolution) and scaled to an intensity i = 64 + 191 sigmoid(0.5 e + 2 t - 5), exactly the causal process of the
Morpho-MNIST data (Pawlowski et al. 2020). The folder is written in Morpho-MNIST's own format (`train-*` files), so
`train_unet.py --extra_train_data_dir` and `diffscm.data.load_morphomnist` read it. The bundled digits are MNIST
*training* digits, disjoint from the Morpho-MNIST test digits that the shipped pipelines hold out.
"""

import argparse
import shlex
import sys
from multiprocessing import Pool
from pathlib import Path

import datasets

from diffscm import training
from diffscm.data import load_image_dataset, redraw_morphomnist, save_morphomnist


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None, help="'mnist-bundled' (the default).")
    parser.add_argument("--dataset_name", default=None, help="A Hub data set with image and label columns.")
    parser.add_argument("--train_data_dir", default=None, help="An imagefolder tree or a Morpho-MNIST folder.")
    parser.add_argument("--variants", type=int, default=4, help="Re-drawn copies of every digit.")
    parser.add_argument(
        "--distribution", default="data", choices=("data", "independent"),
        help="Thickness and intensity as the data drew them (correlated through the intensity mechanism), or "
        "independently over their ranges, so that a conditional mechanism learns to follow each one.",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_proc", type=int, default=2)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    if args.variants < 1 or args.num_proc < 1:
        parser.error("--variants and --num_proc must be >= 1.")
    return args


def _redraw_shard(job: tuple) -> datasets.Dataset:
    source, index, num_shards, variants, seed, distribution = job
    shard = source.shard(num_shards, index, contiguous=True)
    return redraw_morphomnist(shard, variants, seed=seed + index, distribution=distribution)


def main(args: argparse.Namespace):
    source = load_image_dataset(args.dataset, args.dataset_name, args.train_data_dir)
    jobs = [(source, i, args.num_proc, args.variants, args.seed, args.distribution) for i in range(args.num_proc)]
    with Pool(args.num_proc) as pool:
        redrawn = datasets.concatenate_datasets(pool.map(_redraw_shard, jobs))
    save_morphomnist(redrawn, args.output_dir, prefix="train")
    command = "python training_scripts/redraw_morphomnist.py " + shlex.join(sys.argv[1:])
    training.write_json(Path(args.output_dir) / "redraw.json", {"command": command, "num_images": len(redrawn)})
    print(f"Wrote {len(redrawn)} digits to {args.output_dir}")


if __name__ == "__main__":
    training.run_script(main, parse_args)
