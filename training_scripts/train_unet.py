"""Train the noise model eps_theta of Diff-SCM (the image's causal mechanism) with accelerate.

    accelerate launch training_scripts/train_unet.py --dataset mnist-bundled --output_dir outputs/mnist-unet --use_ema

With --causal_graph (`morphomnist`, `digit`, or a JSON file) the noise model is conditioned on the image's parents,
eps_theta(x_t, t, pa): the image's structural mechanism x = f(pa, u). The parents enter through diffusers' own class
conditioning (`class_embed_type="identity"`) from a `ParentEmbedding`; every parent is dropped independently with
probability --parent_dropout, which gives classifier-free guidance per parent. An unconditional UNet given by
--pretrained_model_name_or_path is fine-tuned into a conditional one (the embedding starts at zero). With
--semantic_latent_dim a `SemanticEncoder` reads a latent z from the clean image that conditions the noise model too
(semantic abduction, Rasal et al. 2025), its KL to N(0, I) weighted by --semantic_kl_weight.

Writes `unet/` (EMA weights when --use_ema), `parent_embedding/` and `semantic_encoder/` (conditional only),
`scheduler/` (DDIM, no clipping), `split.json`, `training_args.json`, sample grids under `samples/` and resumable
`checkpoint-N/` folders.
"""

import argparse
import logging
import math
import os

import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.training_utils import compute_snr
from diffusers.utils import make_image_grid

from diffscm import CausalGraph, ParentEmbedding, SemanticEncoder, training

logger = logging.getLogger(__name__)
SCRIPT = "train_unet.py"


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
    model.add_argument(
        "--resnet_time_scale_shift",
        default="scale_shift",
        choices=("default", "scale_shift"),
        help="How the time (and parent) embedding enters each ResNet block: scale and shift of the normalised "
        "features (AdaGN, Dhariwal & Nichol 2021), or added ('default', diffusers' own default).",
    )
    model.add_argument(
        "--prediction_type",
        default="epsilon",
        choices=("epsilon", "v_prediction"),
        help="What the UNet predicts: the noise, or the velocity v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0.",
    )
    model.add_argument("--num_train_timesteps", type=int, default=1000)
    model.add_argument("--beta_schedule", default="linear", choices=("linear", "scaled_linear", "squaredcos_cap_v2"))
    model.add_argument(
        "--causal_graph",
        default=None,
        help="Condition on the image's parents: 'morphomnist', 'digit' (label -> image) or a JSON graph file.",
    )
    model.add_argument(
        "--parent_dropout", type=float, default=0.15, help="Probability of dropping each parent (conditional)."
    )
    model.add_argument(
        "--semantic_latent_dim",
        type=int,
        default=0,
        help="Semantic abduction: a SemanticEncoder reads a latent of this size from the clean image, which "
        "conditions the noise model beside the parents (with --causal_graph); 0: none, or the fine-tuned pipeline's "
        "own encoder.",
    )
    model.add_argument(
        "--semantic_kl_weight",
        type=float,
        default=1e-6,
        help="Weight of the semantic latent's KL to N(0, I) (nats per image) against the noise loss (a mean per "
        "pixel); it keeps in z only what the parents do not say. It acts after --semantic_kl_warmup_steps.",
    )
    model.add_argument(
        "--semantic_kl_warmup_steps",
        type=int,
        default=1000,
        help="Steps without the KL term, so that the noise model learns to read z before the KL term can empty it "
        "(posterior collapse: Adam scales even a tiny KL gradient up to full steps while z is not yet read).",
    )
    parser.add_argument(
        "--snr_gamma",
        type=float,
        default=5.0,
        help="Min-SNR-gamma loss weighting (Hang et al. 2023): min(SNR_t, gamma) / SNR_t; 0 weighs every step alike.",
    )
    parser.add_argument("--save_images_steps", type=int, default=500, help="Write a sample grid every N steps.")
    parser.add_argument("--eval_batch_size", type=int, default=16, help="Images in each sample grid.")
    # A constant rate after warm-up, so that a run (or a later session) can extend --max_train_steps and go on.
    parser.set_defaults(lr_scheduler="constant_with_warmup")
    args = parser.parse_args(argv)
    training.check_training_args(args)
    if args.snr_gamma < 0:
        parser.error(f"--snr_gamma must be >= 0, got {args.snr_gamma}.")
    if not 0 <= args.parent_dropout < 1:
        parser.error(f"--parent_dropout must be in [0, 1), got {args.parent_dropout}.")
    if args.semantic_latent_dim < 0 or args.semantic_kl_weight < 0 or args.semantic_kl_warmup_steps < 0:
        parser.error("--semantic_latent_dim, --semantic_kl_weight and --semantic_kl_warmup_steps must be >= 0.")
    if args.semantic_latent_dim and args.causal_graph is None:
        parser.error("--semantic_latent_dim conditions the noise model beside the parents: give --causal_graph too.")
    try:
        if args.causal_graph is not None:
            CausalGraph.load(args.causal_graph)
    except (OSError, ValueError, TypeError) as error:
        parser.error(f"--causal_graph {args.causal_graph!r}: {error}")
    return args


class ConditionalNoiseModel(torch.nn.Module):
    """eps_theta(x_t, t, pa) for training: the UNet conditioned through the parent embedding, and with a semantic
    encoder eps_theta(x_t, t, pa, z), z drawn from q(z | x_0)."""

    def __init__(self, unet: UNet2DModel, parent_embedding: ParentEmbedding, semantic_encoder=None):
        super().__init__()
        self.unet, self.parent_embedding, self.semantic_encoder = unet, parent_embedding, semantic_encoder

    def forward(self, sample, timesteps, values: dict, dropped: dict, clean=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The prediction and each image's KL of its semantic latent (0 without an encoder). z is the prior's mean
        without `clean` images, and wherever a parent is dropped: z never stands in for a parent, so it has no
        reason to carry one."""
        labels, kl = self.parent_embedding(values, dropped), torch.zeros(len(sample), device=sample.device)
        if self.semantic_encoder is not None:
            latent = torch.zeros(len(sample), self.semantic_encoder.config.latent_dim, device=sample.device)
            if clean is not None:
                mean, log_variance = self.semantic_encoder(clean)
                latent = mean + (0.5 * log_variance).exp() * torch.randn_like(mean)
                latent = torch.where(any_dropped(dropped, len(sample), sample.device)[:, None], 0.0, latent)
                kl = SemanticEncoder.kl(mean.float(), log_variance.float())
            labels = labels + self.semantic_encoder.embed(latent)
        return self.unet(sample, timesteps, class_labels=labels).sample, kl


def any_dropped(dropped: dict, size: int, device) -> torch.Tensor:
    """`(size,)` bools: is any parent dropped for the sample."""
    flags = [torch.as_tensor(drop, device=device).reshape(-1).expand(size) for drop in dropped.values()]
    return torch.stack(flags).any(0) if flags else torch.zeros(size, dtype=torch.bool, device=device)


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
        resnet_time_scale_shift=args.resnet_time_scale_shift,
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
        raise ValueError(
            f"{path} takes {unet.config.in_channels}x{unet.config.sample_size}x{unet.config.sample_size} "
            f"images; --resolution {args.resolution} --num_channels {args.num_channels} differ."
        )
    return unet


def noise_model(args: argparse.Namespace, graph: CausalGraph | None) -> torch.nn.Module:
    """The UNet, or (with --causal_graph) the UNet with identity class conditioning and its parent embedding; a
    pretrained unconditional UNet keeps every weight (the identity class embedding has none)."""
    unet = load_or_build_unet(args)
    if graph is None:
        return unet
    if unet.config.class_embed_type is None:
        conditional = UNet2DModel.from_config(unet.config, class_embed_type="identity")
        conditional.load_state_dict(unet.state_dict())
        unet = conditional
    elif unet.config.class_embed_type != "identity":
        raise ValueError(f"the pretrained UNet has class_embed_type {unet.config.class_embed_type!r}.")
    embedding_dir = os.path.join(args.pretrained_model_name_or_path or "", "parent_embedding")
    if os.path.isdir(embedding_dir):
        embedding = ParentEmbedding.from_pretrained(embedding_dir)
        if embedding.parents != graph.parent_specs():
            raise ValueError(f"{embedding_dir} embeds {embedding.parents}, not this graph's parents.")
    else:
        # From scratch the parents are drawn like diffusers' class embeddings; a pretrained UNet starts unchanged.
        embedding = ParentEmbedding(
            parents=graph.parent_specs(),
            embedding_dim=4 * unet.config.block_out_channels[0],
            zero_init=args.pretrained_model_name_or_path is not None,
        )
    return ConditionalNoiseModel(unet, embedding, semantic_encoder(args, embedding.config.embedding_dim))


def semantic_encoder(args: argparse.Namespace, embedding_dim: int) -> SemanticEncoder | None:
    """The fine-tuned pipeline's semantic encoder, a new one of --semantic_latent_dim, or None."""
    encoder_dir = os.path.join(args.pretrained_model_name_or_path or "", "semantic_encoder")
    if os.path.isdir(encoder_dir):
        encoder = SemanticEncoder.from_pretrained(encoder_dir)
        if args.semantic_latent_dim not in (0, encoder.config.latent_dim):
            raise ValueError(
                f"{encoder_dir} reads a latent of {encoder.config.latent_dim}, not --semantic_latent_dim "
                f"{args.semantic_latent_dim}: leave the flag out to fine-tune it."
            )
        return encoder
    if not args.semantic_latent_dim:
        return None
    return SemanticEncoder(args.num_channels, args.semantic_latent_dim, embedding_dim)


def weighted_loss(predicted, clean, noise, noise_scheduler, timesteps, snr_gamma: float) -> torch.Tensor:
    """The MSE against the noise (or, for v-prediction, the velocity), each image weighted by min(SNR_t, gamma) /
    SNR_t (or / (SNR_t + 1)), uniform when gamma is 0."""
    v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
    target = training.noise_target(noise_scheduler, clean, noise, timesteps)
    per_image = F.mse_loss(predicted.float(), target, reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        snr = compute_snr(noise_scheduler, timesteps)
        per_image = per_image * snr.clamp(max=snr_gamma) / (snr + 1 if v_prediction else snr)
    return per_image.mean()


@torch.no_grad()
def save_samples(model, scheduler, args, step: int, values: dict | None = None):
    """A grid of --eval_batch_size DDIM samples (50 steps, fixed seed) from the current weights; a conditional
    model's under the parents of as many training images (`values`). The noise comes from a generator of its own:
    reseeding the global RNG here would change the training noise after a checkpoint saved it, and a resumed run
    would no longer be exact."""
    scheduler = DDIMScheduler.from_config(scheduler.config, clip_sample=False)
    count = args.eval_batch_size if values is None else len(next(iter(values.values())))
    if values is None:
        pipe = DDIMPipeline(unet=model, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=count, num_inference_steps=50, generator=torch.Generator().manual_seed(0)).images
    else:
        size = model.unet.config.sample_size
        sample = torch.randn(count, args.num_channels, size, size, generator=torch.Generator().manual_seed(0))
        scheduler.set_timesteps(50)
        for t in scheduler.timesteps:
            sample = scheduler.step(model(sample, t, values, {})[0], t, sample).prev_sample
        images = DDIMPipeline.numpy_to_pil(((sample.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy())
    path = os.path.join(args.output_dir, "samples", f"step-{step:06d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rows = max(r for r in range(1, math.isqrt(count) + 1) if count % r == 0)
    make_image_grid(images, rows=rows, cols=count // rows).save(path)


def main(args: argparse.Namespace):
    accelerator = training.make_accelerator(args)
    split, split_record = training.load_split(args)
    graph, mechanism_fit = training.load_graph(args, split)
    values = training.parent_values(graph, split["train"]) if graph is not None else None
    dataloader = training.make_dataloader(split["train"], args, values=values)
    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
        prediction_type=args.prediction_type,
    )  # fmt: skip
    unet, optimizer, dataloader, lr_scheduler, ema = training.prepare_model(
        accelerator, noise_model(args, graph), dataloader, args
    )
    sample_values = None
    if graph is not None:  # the parents of the first training images, for the sample grids
        sample_values = {name: torch.as_tensor(value[: args.eval_batch_size]) for name, value in values.items()}
    if accelerator.is_main_process:
        # The scheduler goes first so that the anti-causal classifier can train on this schedule in parallel.
        DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False).save_pretrained(
            os.path.join(args.output_dir, "scheduler")
        )
    training.start_run(accelerator, args, "train_unet", split_record)

    semantic = graph is not None and accelerator.unwrap_model(unet).semantic_encoder is not None

    def compute_loss(model, batch):
        clean = batch["pixel_values"]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, args.num_train_timesteps, (clean.shape[0],), device=clean.device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        if graph is None:
            predicted = model(noisy, timesteps).sample
        else:
            values = training.batch_values(batch)
            dropped = {name: torch.rand(len(clean), device=clean.device) < args.parent_dropout for name in values}
            predicted, kl = model(noisy, timesteps, values, dropped, clean)
        loss = weighted_loss(predicted, clean, noise, noise_scheduler, timesteps, args.snr_gamma)
        if not semantic:
            return loss
        step = lr_scheduler.scheduler.last_epoch // accelerator.num_processes  # the optimizer's steps, resumed too
        weight = args.semantic_kl_weight if step >= args.semantic_kl_warmup_steps else 0.0
        return loss + weight * kl.mean(), {"kl": kl.mean().item()}

    def write_samples(step):
        if accelerator.is_main_process and (step % args.save_images_steps == 0 or step == args.max_train_steps):
            model = training.trained_model(accelerator, unet, ema)
            save_samples(model, noise_scheduler, args, step, sample_values)

    images_before = training.images_seen_by(args.pretrained_model_name_or_path)
    steps, seconds = training.train(
        accelerator, args, unet, optimizer, lr_scheduler, dataloader, compute_loss, ema, write_samples, SCRIPT,
        images_before,
    )  # fmt: skip
    if accelerator.is_main_process:
        model = training.trained_model(accelerator, unet, ema)
        if graph is None:
            model.save_pretrained(os.path.join(args.output_dir, "unet"))
        else:
            model.unet.save_pretrained(os.path.join(args.output_dir, "unet"))
            model.parent_embedding.save_pretrained(os.path.join(args.output_dir, "parent_embedding"))
            if model.semantic_encoder is not None:
                model.semantic_encoder.save_pretrained(os.path.join(args.output_dir, "semantic_encoder"))
            training.write_json(os.path.join(args.output_dir, "causal_graph.json"), graph.to_config())
            training.write_json(os.path.join(args.output_dir, "mechanism_fit.json"), mechanism_fit)
        seconds_per_step = training.record_run(
            args, SCRIPT, steps, seconds, num_processes=accelerator.num_processes, images_before=images_before
        )
        logger.info(f"Saved the UNet to {args.output_dir}/unet ({seconds_per_step} s/step)")
    accelerator.end_training()


if __name__ == "__main__":
    training.run_script(main, parse_args)
