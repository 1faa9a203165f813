"""Train the VAE whose posteriors measure minimality (CLD) of counterfactuals; it judges, never guides.

    accelerate launch training_scripts/train_vae.py --dataset mnist-bundled --output_dir outputs/mnist-vae \\
        --export_dir checkpoints/mnist-vae

It trains on the same seeded training split as the pipeline and reports the held-out negative ELBO.
"""

import argparse
import logging
import os

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
    parser.add_argument("--export_dir", default=None, help="Where the VAE goes (default: OUTPUT/vae).")
    args = parser.parse_args(argv)
    training.check_training_args(args)
    args.export_dir = args.export_dir or os.path.join(args.output_dir, "vae")
    return args


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

    steps, seconds = training.train(accelerator, args, vae, optimizer, lr_scheduler, dataloader, compute_loss, ema)
    if accelerator.is_main_process:
        final = training.trained_model(accelerator, vae, ema)
        heldout = training.make_dataloader(split["heldout"], args, shuffle=False)
        loss = heldout_loss(final, heldout, args, accelerator.device)
        record = {"heldout_negative_elbo": loss, "split": split_record}
        training.export_judge(args, final, "train_vae.py", steps, seconds, record)
        model_cards.write_vae_card(args.export_dir)
        print(f"held-out negative ELBO of the VAE: {loss:.2f} per image ({split_record['num_heldout']} images)")
    accelerator.end_training()


if __name__ == "__main__":
    training.run_script(main, parse_args)
