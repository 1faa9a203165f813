"""Train the noise model eps_theta of Diff-SCM (the image's causal mechanism) with accelerate.

    accelerate launch training_scripts/train_unet.py --dataset mnist-bundled --output_dir outputs/mnist-unet --use_ema

Writes `unet/` (EMA weights when --use_ema), `scheduler/` (DDIM, no clipping), `split.json`, `training_args.json`,
sample grids under `samples/` and resumable `checkpoint-N/` folders.
"""

import argparse
import copy
import logging
import math
import os
import time

import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from diffscm import training

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training.add_training_args(parser)
    model = parser.add_argument_group("model")
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
    unet = build_unet(args)
    ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, model_cls=UNet2DModel, model_config=unet.config)
    optimizer, lr_scheduler = training.optimizer_and_schedule(unet, args)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    if args.use_ema:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if accelerator.is_main_process:
        # The scheduler goes first so that the anti-causal classifier can train on this schedule in parallel.
        DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False).save_pretrained(
            os.path.join(args.output_dir, "scheduler")
        )
        training.write_json(os.path.join(args.output_dir, "split.json"), split_record)
        accelerator.init_trackers("train_unet", config={k: str(v) for k, v in vars(args).items()})

    first_step = training.maybe_resume(accelerator, args)
    batches = training.batches_from(accelerator, dataloader, first_step, args.gradient_accumulation_steps)
    progress = tqdm(range(first_step, args.max_train_steps), disable=not accelerator.is_local_main_process)
    started = time.perf_counter()
    for step in progress:
        for _ in range(args.gradient_accumulation_steps):
            clean = next(batches)["pixel_values"]
            with accelerator.accumulate(unet):
                noise = torch.randn_like(clean)
                timesteps = torch.randint(0, args.num_train_timesteps, (clean.shape[0],), device=clean.device)
                noisy = noise_scheduler.add_noise(clean, noise, timesteps)
                loss = F.mse_loss(unet(noisy, timesteps).sample.float(), noise)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"The loss became {loss.item()} at step {step}; lower --learning_rate.")
        if args.use_ema:
            ema.step(unet.parameters())
        done = step + 1
        logs = {"loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0]}
        progress.set_postfix(**logs)
        accelerator.log(logs, step=done)
        if done % args.checkpointing_steps == 0 or done == args.max_train_steps:
            training.save_checkpoint(accelerator, args, done)
        if accelerator.is_main_process and (done % args.save_images_steps == 0 or done == args.max_train_steps):
            save_samples(export_unet(accelerator, unet, ema, args), noise_scheduler, args, done)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export_unet(accelerator, unet, ema, args).save_pretrained(os.path.join(args.output_dir, "unet"))
        seconds_per_step = training.record_run(
            args, "train_unet.py", args.max_train_steps - first_step, time.perf_counter() - started
        )
        logger.info(f"Saved the UNet to {args.output_dir}/unet ({seconds_per_step:.3f} s/step)")
    accelerator.end_training()


def export_unet(accelerator, unet, ema, args) -> UNet2DModel:
    """A standalone copy of the trained UNet, with the EMA weights when --use_ema."""
    unet = copy.deepcopy(accelerator.unwrap_model(unet)).float()
    if args.use_ema:
        ema.copy_to(unet.parameters())
    return unet.eval()


if __name__ == "__main__":
    main(parse_args())
