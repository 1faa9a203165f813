"""Train the VAE whose posteriors measure minimality (CLD) of counterfactuals; it judges, never guides.

    accelerate launch training_scripts/train_vae.py --dataset mnist-bundled --output_dir outputs/mnist-vae \\
        --export_dir checkpoints/mnist-vae

It trains on the same seeded training split as the pipeline and reports the held-out negative ELBO.
"""

import argparse
import logging

import torch

from diffscm import model_cards, training
from diffscm.evaluation.vae import DigitVAE, vae_loss

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_training_args(parser)
    parser.add_argument("--channels", type=int, nargs=2, default=[32, 64])
    parser.add_argument("--latent_dim", type=int, default=16)
    parser.add_argument("--beta", type=float, default=1.0, help="Weight of the KL term.")
    return training.parse_judge_args(parser, argv, "vae")


@torch.no_grad()
def heldout_loss(model: DigitVAE, dataloader, args, device) -> float:
    generator = torch.Generator(device=device).manual_seed(0)
    losses = [
        vae_loss(
            model(batch["pixel_values"].to(device), generator=generator), batch["pixel_values"].to(device), args.beta
        )
        for batch in dataloader
    ]
    return torch.stack(losses).mean().item()


def main(args: argparse.Namespace):
    accelerator = training.make_accelerator(args)
    split, split_record = training.load_split(args)
    dataloader = training.make_dataloader(split["train"], args)
    vae = DigitVAE(args.resolution, args.num_channels, tuple(args.channels), args.latent_dim)
    vae, optimizer, dataloader, lr_scheduler, ema = training.prepare_model(accelerator, vae, dataloader, args)
    training.start_run(accelerator, args, "train_vae", split_record)

    def compute_loss(model, batch):
        return vae_loss(model(batch["pixel_values"]), batch["pixel_values"], args.beta)

    run = training.train(accelerator, args, vae, optimizer, lr_scheduler, dataloader, compute_loss, ema)
    training.export_judge(
        accelerator, args, vae, ema, split, split_record, "train_vae.py", run, "heldout_negative_elbo",
        lambda model, batches: heldout_loss(model, batches, args, accelerator.device), model_cards.write_vae_card,
        "held-out negative ELBO of the VAE per image",
    )  # fmt: skip


if __name__ == "__main__":
    training.run_script(main, parse_args)
