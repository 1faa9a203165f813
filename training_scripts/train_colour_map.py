"""Fit a pipeline's colour map: the parents that act on the image only through its colours (`ParentColourMap`).

    accelerate launch training_scripts/train_colour_map.py \\
        --pipeline checkpoints/in-progress/colour-mnist-conditional --dataset_name data/colour-mnist \\
        --colour_parents hue --reference hue=0.5 \\
        --output_dir outputs/colour-map --pipeline_output_dir outputs/pipeline-colour-map

The pipeline's conditional UNet and parent embedding stay frozen. The colour matrix x = A(c) y (images in [0, 1]), the
identity at the reference values, is fitted so that the UNet, told the colour parents' reference values, denoises y =
A(c)^-1 x of each training image as well as it can (its own training loss, t uniform): y is then the image as it would
look at the reference colour, and an intervention on those parents recolours the image instead of redrawing it. A
penalty --identity_weight * |A - I|^2 keeps the colour directions that the data never use as they are. Give the data
and split that the pipeline was trained on.

Writes `colour_map/`, held-out noise losses (`heldout_metrics.json`: the UNet told the true values, told the
reference values without and with the map) and the pipeline with its colour map (`--pipeline_output_dir`), whose
`training.json` adds this command to the pipeline's.
"""

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from diffscm import DiffSCMPipeline, ParentColourMap, hub, model_cards, training
from diffscm.options import parse_assignments

logger = logging.getLogger(__name__)
SCRIPT = "train_colour_map.py"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="A conditional DiffSCMPipeline folder (its UNet is frozen).")
    parser.add_argument(
        "--pipeline_output_dir", default=None, help="Where the pipeline goes (default: OUTPUT/pipeline)."
    )
    parser.add_argument("--colour_parents", nargs="+", required=True, help="The image's parents that set its colour.")
    parser.add_argument(
        "--reference", nargs="+", required=True, help="NAME=VALUE for each colour parent: the colour the UNet draws."
    )
    parser.add_argument("--identity_weight", type=float, default=1e-5, help="The weight of |A - I|^2.")
    parser.add_argument("--hidden_dim", type=int, default=64, help="The map's MLP width.")
    training.add_training_args(parser)
    parser.set_defaults(num_channels=None, resolution=None, learning_rate=5e-4, lr_warmup_steps=0)
    args = parser.parse_args(argv)
    training.check_training_args(args)
    if not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
        parser.error(f"--pipeline {args.pipeline!r} is not a pipeline folder (it has no model_index.json).")
    args.pipeline_output_dir = args.pipeline_output_dir or os.path.join(args.output_dir, "pipeline")
    if args.identity_weight < 0:
        parser.error("--identity_weight must be >= 0.")
    try:
        args.reference = parse_assignments(args.reference, "--reference")
    except ValueError as error:
        parser.error(str(error))
    if set(args.reference) != set(args.colour_parents):
        parser.error(f"--reference must give NAME=VALUE for each of --colour_parents {args.colour_parents}.")
    return args


def load_frozen_pipeline(args: argparse.Namespace) -> DiffSCMPipeline:
    """The pipeline whose UNet the map is fitted against; the image size and channels follow its UNet."""
    pipe = DiffSCMPipeline.from_pretrained(args.pipeline)
    if pipe.parent_embedding is None:
        raise ValueError(f"{args.pipeline} has a classifier-guided mechanism; a colour map needs a conditional one.")
    channels, size = pipe.unet_sample_shape
    for flag, value in (("num_channels", channels), ("resolution", size)):
        if getattr(args, flag) not in (None, value):
            raise ValueError(f"--{flag} {getattr(args, flag)} disagrees with the pipeline's UNet ({value}).")
        setattr(args, flag, value)
    for module in (pipe.unet, pipe.parent_embedding):
        module.requires_grad_(False).eval()
    return pipe


def build_colour_map(pipe: DiffSCMPipeline, args: argparse.Namespace) -> ParentColourMap:
    """A new map of the colour parents, each reference value in the variable's own terms (a class name or index)."""
    graph, specs = pipe.causal_graph, pipe.causal_graph.parent_specs()
    unknown = [name for name in args.colour_parents if name not in specs]
    if unknown:
        raise ValueError(f"--colour_parents {unknown} are not parents of the image; they are {sorted(specs)}.")
    reference = {name: graph.nodes[name].encode([value]).tolist()[0] for name, value in args.reference.items()}
    parents = {name: specs[name] for name in args.colour_parents}
    return ParentColourMap(parents, reference, args.num_channels, args.hidden_dim)


class ReferenceColour(torch.nn.Module):
    """y = A(c)^-1 x and A(c), the pass that training differentiates (through accelerate's wrapper, so that
    the gradients are synchronised across processes)."""

    def __init__(self, colour_map: ParentColourMap):
        super().__init__()
        self.colour_map = colour_map

    def forward(self, sample: torch.Tensor, values: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return self.colour_map.to_reference(sample, values), self.colour_map.colour_matrix(values)


def noise_loss(pipe: DiffSCMPipeline, clean: torch.Tensor, values: dict, generator=None) -> torch.Tensor:
    """The frozen UNet's loss per image (eps or v, as it was trained) at t uniform, told `values`."""
    scheduler = pipe.scheduler
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
    noise = torch.randn(clean.shape, generator=generator).to(clean)
    timesteps = timesteps.to(clean.device)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    output = pipe.unet(noisy, timesteps, class_labels=pipe.parent_embedding(values)).sample.float()
    target = training.noise_target(scheduler, clean, noise, timesteps)
    return ((output - target.float()) ** 2).mean(dim=(1, 2, 3))


@torch.no_grad()
def heldout_metrics(pipe: DiffSCMPipeline, colour_map: ParentColourMap, dataloader, repeats: int = 4) -> dict:
    """Mean held-out noise loss (the same noise for all three): the UNet told the true values, told the reference
    values, and told the reference values of the image through the map; a fitted map brings the last from the
    second towards the first."""
    generator, sums, total = torch.Generator().manual_seed(0), dict.fromkeys(("true", "reference", "mapped"), 0.0), 0
    for batch in dataloader:
        clean, values = batch["pixel_values"].to(pipe.device), training.batch_values(batch)
        reference = pipe.reference_colour_values(values)
        mapped = colour_map.to_reference(clean, values)
        for _ in range(repeats):
            seed = int(torch.randint(0, 2**31, (1,), generator=generator))
            for name, image, told in (
                ("true", clean, values),
                ("reference", clean, reference),
                ("mapped", mapped, reference),
            ):
                sums[name] += noise_loss(pipe, image, told, torch.Generator().manual_seed(seed)).sum().item()
        total += repeats * len(clean)
    return {name: value / total for name, value in sums.items()}


def main(args: argparse.Namespace):
    accelerator = training.make_accelerator(args)
    pipe = load_frozen_pipeline(args)
    split, split_record = training.load_split(args)
    check_same_split(args, split_record)
    values = training.parent_values(pipe.causal_graph, split["train"])
    dataloader = training.make_dataloader(split["train"], args, values=values)
    colour_map = build_colour_map(pipe, args)
    pipe.register_modules(colour_map=colour_map)  # the pipeline's reference values are the map's
    model, optimizer, dataloader, lr_scheduler, ema = training.prepare_model(
        accelerator, ReferenceColour(colour_map), dataloader, args
    )
    pipe.to(accelerator.device)
    training.start_run(accelerator, args, "train_colour_map", split_record)

    def compute_loss(model, batch):
        clean, values = batch["pixel_values"], training.batch_values(batch)
        reference, matrix = model(clean, values)
        loss = noise_loss(pipe, reference, pipe.reference_colour_values(values)).mean()
        identity = ((matrix - torch.eye(args.num_channels, device=matrix.device)) ** 2).sum(dim=(1, 2)).mean()
        return loss + args.identity_weight * identity, {"noise_loss": loss.item(), "identity": identity.item()}

    steps, seconds = training.train(
        accelerator, args, model, optimizer, lr_scheduler, dataloader, compute_loss, ema, script=SCRIPT
    )
    if accelerator.is_main_process:
        final = training.trained_model(accelerator, model, ema).colour_map
        final.save_pretrained(os.path.join(args.output_dir, "colour_map"))
        heldout_values = training.parent_values(pipe.causal_graph, split["heldout"])
        heldout = training.make_dataloader(split["heldout"], args, shuffle=False, values=heldout_values)
        metrics = heldout_metrics(pipe, final, heldout)
        training.write_json(os.path.join(args.output_dir, "heldout_metrics.json"), metrics)
        print("held-out noise loss: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
        training.record_run(args, SCRIPT, steps, seconds, num_processes=accelerator.num_processes)
        export_pipeline(final, args, metrics)
    accelerator.end_training()


def check_same_split(args: argparse.Namespace, split_record: dict):
    """The map must hold out the very images the pipeline held out."""
    record = Path(args.pipeline) / "training.json"
    split = json.loads(record.read_text()).get("split", {}) if record.is_file() else {}
    if split.get("heldout_indices") not in (None, split_record["heldout_indices"]):
        raise ValueError(
            f"this data split differs from the pipeline's ({record}); use its data, --holdout_size and --split_seed, "
            "or held-out images would leak into training."
        )


def export_pipeline(colour_map: ParentColourMap, args: argparse.Namespace, metrics: dict):
    """The pipeline with its colour map and card; `training.json` is the pipeline's with this run added."""
    pipe = DiffSCMPipeline.from_pretrained(args.pipeline, colour_map=colour_map)
    pipe.save_pretrained(args.pipeline_output_dir)
    source = Path(args.pipeline) / "training.json"
    record = json.loads(source.read_text()) if source.is_file() else {"commands": []}
    run = training.read_json(Path(args.output_dir) / "training_args.json")
    record["commands"] = [*record.get("commands", []), run["command"]]
    record |= {"colour_map_seconds_per_step": run["seconds_per_step"], "colour_map_metrics": metrics}
    training.write_json(Path(args.pipeline_output_dir) / "training.json", record)
    model_cards.write_model_card(args.pipeline_output_dir)
    logger.info(f"Saved the DiffSCMPipeline with its colour map to {args.pipeline_output_dir}")
    if args.push_to_hub:
        url = hub.push_to_hub(args.pipeline_output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
        logger.info(f"Pushed to {url}")


if __name__ == "__main__":
    training.run_script(main, parse_args)
