"""Train the noise model eps_theta of Diff-SCM (the image's causal mechanism) with accelerate.

    accelerate launch training_scripts/train_unet.py --dataset mnist-bundled --output_dir outputs/mnist-unet --use_ema

Writes `unet/` (EMA weights when --use_ema), `scheduler/` (DDIM, no clipping), `split.json`, `training_args.json`,
sample grids under `samples/` and resumable `checkpoint-N/` folders.
"""

import argparse
import logging
import os

import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.utils import make_image_grid

from diffscm import training

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_training_args(parser)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="Fine-tune this UNet (a pipeline folder with `unet/`, or a UNet folder) instead of new weights.",
    )
    model.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64, 64])
    model.add_argument("--layers_per_block", type=int, default=1)
    model.add_argument("--attention_head_dim", type=int, default=8)
    model.add_argument("--num_train_timesteps", type=int, default=1000)
    model.add_argument("--beta_schedule", default="linear", choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    parser.add_argument("--save_images_steps", type=int, default=500, help="Write a sample grid every N steps.")
    args = parser.parse_args(argv)
    training.check_training_args(args)
    return args


def build_unet(args: argparse.Namespace) -> UNet2DModel:
    """A UNet2DModel with len(block_out_channels) levels and attention only at the lowest resolution."""
    levels = len(args.block_out_channels)
    return UNet2DModel(
        sample_size=args.resolution,
        in_channels=args.num_channels,
        out_channels=args.num_channels,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        attention_head_dim=args.attention_head_dim,
        norm_num_groups=min(32, args.block_out_channels[0]),
    )


def load_or_build_unet(args: argparse.Namespace) -> UNet2DModel:
    """New weights, or the weights of --pretrained_model_name_or_path to fine-tune (its architecture wins)."""
    if args.pretrained_model_name_or_path is None:
        return build_unet(args)
    path = args.pretrained_model_name_or_path
    subfolder = None if os.path.isfile(os.path.join(path, "config.json")) else "unet"
    unet = UNet2DModel.from_pretrained(path, subfolder=subfolder)
    if (unet.config.sample_size, unet.config.in_channels) != (args.resolution, args.num_channels):
        raise SystemExit(
            f"error: {path} takes {unet.config.in_channels}x{unet.config.sample_size}x{unet.config.sample_size} "
            f"images; --resolution {args.resolution} --num_channels {args.num_channels} differ."
        )
    return unet


def save_samples(unet, scheduler, args, step: int):
    """A 4x4 grid of unconditional DDIM samples (50 steps, fixed seed) from the current weights."""
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config, clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=16, num_inference_steps=50, generator=torch.manual_seed(0)).images
    path = os.path.join(args.output_dir, "samples", f"step-{step:06d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    make_image_grid(images, rows=4, cols=4).save(path)


def main(args: argparse.Namespace):
    accelerator = training.make_accelerator(args)
    split, split_record = training.load_split(args)
    dataloader = training.make_dataloader(split["train"], args)
    noise_scheduler = DDPMScheduler(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule)
    unet, optimizer, dataloader, lr_scheduler, ema = training.prepare_model(
        accelerator, load_or_build_unet(args), dataloader, args
    )
    if accelerator.is_main_process:
        # The scheduler goes first so that the anti-causal classifier can train on this schedule in parallel.
        DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False).save_pretrained(
            os.path.join(args.output_dir, "scheduler")
        )
    training.start_run(accelerator, args, "train_unet", split_record)

    def compute_loss(model, batch):
        clean = batch["pixel_values"]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, args.num_train_timesteps, (clean.shape[0],), device=clean.device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        return F.mse_loss(model(noisy, timesteps).sample.float(), noise)

    def write_samples(step):
        if accelerator.is_main_process and (step % args.save_images_steps == 0 or step == args.max_train_steps):
            save_samples(training.trained_model(accelerator, unet, ema), noise_scheduler, args, step)

    steps, seconds = training.train(
        accelerator, args, unet, optimizer, lr_scheduler, dataloader, compute_loss, ema, after_step=write_samples
    )
    if accelerator.is_main_process:
        training.trained_model(accelerator, unet, ema).save_pretrained(os.path.join(args.output_dir, "unet"))
        seconds_per_step = training.record_run(args, "train_unet.py", steps, seconds)
        logger.info(f"Saved the UNet to {args.output_dir}/unet ({seconds_per_step} s/step)")
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
