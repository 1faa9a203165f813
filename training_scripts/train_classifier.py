"""Train the noise-aware anti-causal predictor p_phi(label | x_t, t) of Diff-SCM on the UNet's noise schedule.

    accelerate launch training_scripts/train_classifier.py --unet_model_name_or_path outputs/mnist-unet \\
        --output_dir outputs/mnist-classifier --pipeline_output_dir checkpoints/diffscm-mnist --use_ema

x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps with t uniform over the UNet's own training timesteps, so the
pipeline queries the classifier at exactly the raw timesteps it was trained on. Writes `classifier/`, the held-out
accuracy per noise level (`heldout_accuracy.json`), and, once the UNet run has finished, the complete DiffSCMPipeline
folder with its model card (`--pipeline_output_dir`).
"""

import argparse
import json
import logging
import os

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DModel

from diffscm import AntiCausalClassifier, DiffSCMPipeline, hub, training

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet_model_name_or_path", required=True, help="The train_unet.py output folder.")
    parser.add_argument(
        "--pipeline_output_dir", default=None, help="Where the pipeline goes (default: OUTPUT/pipeline)."
    )
    training.add_training_args(parser)
    model = parser.add_argument_group("model")
    model.add_argument("--block_out_channels", type=int, nargs="+", default=[16, 32, 64])
    model.add_argument("--layers_per_block", type=int, default=1)
    model.add_argument("--num_classes", type=int, default=None, help="Default: the number of labels in the data.")
    pipeline = parser.add_argument_group("pipeline defaults recorded in the exported folder")
    pipeline.add_argument("--guidance_scale", type=float, default=1.0)
    pipeline.add_argument("--num_inference_steps", type=int, default=50)
    pipeline.add_argument("--abduction_refinement_steps", type=int, default=0)
    hub_args = parser.add_argument_group("hub")
    hub_args.add_argument("--push_to_hub", action="store_true")
    hub_args.add_argument("--hub_model_id", default=None)
    hub_args.add_argument("--hub_token", default=None)
    args = parser.parse_args(argv)
    training.check_training_args(args)
    if not os.path.isfile(os.path.join(args.unet_model_name_or_path, "scheduler", "scheduler_config.json")):
        parser.error(f"{args.unet_model_name_or_path!r} has no scheduler/: pass the output folder of train_unet.py.")
    args.pipeline_output_dir = args.pipeline_output_dir or os.path.join(args.output_dir, "pipeline")
    return args


def load_schedule(args: argparse.Namespace) -> DDIMScheduler:
    """The UNet run's noise schedule; a resumed run refuses a schedule that changed under it."""
    scheduler = DDIMScheduler.from_pretrained(args.unet_model_name_or_path, subfolder="scheduler")
    recorded = os.path.join(args.output_dir, "noise_schedule.json")
    schedule = schedule_of(scheduler)
    if os.path.isfile(recorded) and json.load(open(recorded)) != schedule:
        raise SystemExit(
            f"error: the UNet's noise schedule {schedule} disagrees with the one this classifier was trained on "
            f"({recorded}); train the classifier again for this UNet."
        )
    return scheduler


def schedule_of(scheduler: DDIMScheduler) -> dict:
    return {k: scheduler.config[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")}


@torch.no_grad()
def heldout_accuracy(classifier, dataloader, scheduler, device, num_levels: int = 10) -> dict[int, float]:
    """Accuracy on the held-out split at evenly spaced raw timesteps (fixed noise seed)."""
    train_steps = scheduler.config.num_train_timesteps
    levels = sorted({round(i * (train_steps - 1) / (num_levels - 1)) for i in range(num_levels)})
    generator = torch.Generator().manual_seed(0)
    correct = dict.fromkeys(levels, 0)
    total = 0
    for batch in dataloader:
        clean, labels = batch["pixel_values"], batch["labels"]
        total += len(labels)
        for t in levels:
            noise = torch.randn(clean.shape, generator=generator)
            noisy = scheduler.add_noise(clean, noise, torch.full((len(clean),), t))
            logits = classifier(noisy.to(device), t).logits
            correct[t] += (logits.argmax(-1).cpu() == labels).sum().item()
    return {t: correct[t] / total for t in levels}


def main(args: argparse.Namespace):
    accelerator = training.make_accelerator(args)
    scheduler = load_schedule(args)
    split, split_record = training.load_split(args)
    check_same_split(args, split_record)
    dataloader = training.make_dataloader(split["train"], args)
    classifier = AntiCausalClassifier(
        sample_size=args.resolution,
        in_channels=args.num_channels,
        num_classes=args.num_classes or training.num_labels(split["train"]),
        down_block_types=("DownBlock2D",) * len(args.block_out_channels),
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        norm_num_groups=min(8, args.block_out_channels[0]),
    )
    classifier, optimizer, dataloader, lr_scheduler, ema = training.prepare_model(
        accelerator, classifier, dataloader, args
    )
    if accelerator.is_main_process:
        training.write_json(os.path.join(args.output_dir, "noise_schedule.json"), schedule_of(scheduler))
    training.start_run(accelerator, args, "train_classifier", split_record)

    def compute_loss(model, batch):
        clean, labels = batch["pixel_values"], batch["labels"]
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
        noisy = scheduler.add_noise(clean, torch.randn_like(clean), timesteps)
        return F.cross_entropy(model(noisy, timesteps).logits.float(), labels)

    steps, seconds = training.train(
        accelerator, args, classifier, optimizer, lr_scheduler, dataloader, compute_loss, ema
    )
    if accelerator.is_main_process:
        final = training.trained_model(accelerator, classifier, ema)
        final.save_pretrained(os.path.join(args.output_dir, "classifier"))
        heldout = training.make_dataloader(split["heldout"], args, shuffle=False)
        accuracy = heldout_accuracy(final, heldout, scheduler, accelerator.device)
        training.write_json(
            os.path.join(args.output_dir, "heldout_accuracy.json"), {str(k): v for k, v in accuracy.items()}
        )
        print("held-out accuracy of p_phi(label | x_t, t):")
        print("\n".join(f"  t = {t:4d}: {acc:.3f}" for t, acc in accuracy.items()))
        training.record_run(args, "train_classifier.py", steps, seconds)
        export_pipeline(final, scheduler, args)
    accelerator.end_training()


def check_same_split(args: argparse.Namespace, split_record: dict):
    """The classifier must hold out the very images the UNet run held out."""
    path = os.path.join(args.unet_model_name_or_path, "split.json")
    if os.path.isfile(path) and json.load(open(path))["heldout_indices"] != split_record["heldout_indices"]:
        raise SystemExit(
            f"error: this data split differs from the UNet run's ({path}); use the same data, --holdout_size and "
            "--split_seed, or held-out images would leak into training."
        )


def export_pipeline(classifier: AntiCausalClassifier, scheduler: DDIMScheduler, args: argparse.Namespace):
    """The complete DiffSCMPipeline folder with its model card; pushed to the Hub when asked."""
    unet_dir = os.path.join(args.unet_model_name_or_path, "unet")
    if not os.path.isdir(unet_dir):
        logger.warning(
            f"No trained UNet in {unet_dir} yet: rerun this command with --resume_from_checkpoint latest once "
            "train_unet.py has finished to write the pipeline folder."
        )
        return
    pipe = DiffSCMPipeline(
        unet=UNet2DModel.from_pretrained(unet_dir),
        scheduler=scheduler,
        classifier=classifier,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        abduction_refinement_steps=args.abduction_refinement_steps,
    )
    pipe.save_pretrained(args.pipeline_output_dir)
    hub.add_remote_code(args.pipeline_output_dir)
    hub.write_training_record(args.pipeline_output_dir, args.unet_model_name_or_path, args.output_dir)
    hub.write_model_card(args.pipeline_output_dir)
    logger.info(f"Saved the DiffSCMPipeline to {args.pipeline_output_dir}")
    if args.push_to_hub:
        url = hub.push_to_hub(args.pipeline_output_dir, args.hub_model_id, token=args.hub_token)
        logger.info(f"Pushed to {url}")


if __name__ == "__main__":
    main(parse_args())
