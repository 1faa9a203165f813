"""Train the noise-aware anti-causal predictor(s) p_phi(parent | x_t, t) of Diff-SCM on the UNet's noise schedule.

    accelerate launch training_scripts/train_classifier.py --unet_model_name_or_path outputs/mnist-unet \\
        --output_dir outputs/mnist-classifier --pipeline_output_dir checkpoints/diffscm-mnist --use_ema

Without --causal_graph: an `AntiCausalClassifier` of the `label` column (graph label -> image). With --causal_graph
(`morphomnist`, or a JSON file `{"nodes": [...]}`): one `AntiCausalPredictor` with a head for every parent of the
image (cross-entropy or Gaussian likelihood), each continuous head conditioned on the image's other parents that it
causes (the anti-causal structure, e.g. p(thickness | x_t, intensity)). Values come from each node's data column.

x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps with t uniform over the UNet's own training timesteps, so the
pipeline queries the predictor at exactly the raw timesteps it was trained on. Writes `classifier/`, held-out
accuracy / MAE per noise level (`heldout_metrics.json`), and, once the UNet run has finished, the complete
DiffSCMPipeline folder with its causal graph and model card (`--pipeline_output_dir`).
"""

import argparse
import json
import logging
import os
from pathlib import Path

import torch
from diffscm.pipelines import checks
from diffusers import DDIMScheduler, UNet2DModel

from diffscm import (
    AntiCausalClassifier,
    AntiCausalPredictor,
    CausalGraph,
    DiffSCMPipeline,
    ParentEmbedding,
    SemanticEncoder,
    hub,
    model_cards,
    training,
)
from diffscm.folder_format import per_parent
from diffscm.options import parse_scale

logger = logging.getLogger(__name__)
SCRIPT = "train_classifier.py"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet_model_name_or_path", required=True, help="The train_unet.py output folder.")
    parser.add_argument(
        "--pipeline_output_dir", default=None, help="Where the pipeline goes (default: OUTPUT/pipeline)."
    )
    training.add_training_args(parser)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="Fine-tune this predictor (a pipeline folder with `classifier/`, or a predictor folder) instead of new "
        "weights; it must predict the same parents.",
    )
    model.add_argument("--block_out_channels", type=int, nargs="+", default=[16, 32, 64])
    model.add_argument("--layers_per_block", type=int, default=1)
    model.add_argument("--num_classes", type=int, default=None, help="Default: the number of labels in the data.")
    model.add_argument(
        "--causal_graph",
        default=None,
        help="'morphomnist' or a JSON file {\"nodes\": [...]} (default: label -> image).",
    )
    pipeline = parser.add_argument_group("pipeline defaults recorded in the exported folder")
    pipeline.add_argument(
        "--guidance_scale", nargs="+", default=["1.0"], help="One scale, or one per parent: digit=12 thickness=4 ..."
    )
    pipeline.add_argument(
        "--cfg_scale", nargs="+", default=["1.0"], help="Classifier-free guidance of a conditional UNet: w or NAME=w."
    )
    pipeline.add_argument("--num_inference_steps", type=int, default=50)
    pipeline.add_argument("--abduction_refinement_steps", type=int, default=0)
    args = parser.parse_args(argv)
    training.check_training_args(args)
    if not os.path.isfile(os.path.join(args.unet_model_name_or_path, "scheduler", "scheduler_config.json")):
        parser.error(f"{args.unet_model_name_or_path!r} has no scheduler/: pass the output folder of train_unet.py.")
    args.pipeline_output_dir = args.pipeline_output_dir or os.path.join(args.output_dir, "pipeline")
    try:
        graph = CausalGraph.load(args.causal_graph) if args.causal_graph else None
    except (OSError, ValueError, TypeError) as error:
        parser.error(f"--causal_graph {args.causal_graph!r}: {error}")
    parents = graph.image_parents if graph is not None else ("label",)
    for name in ("guidance_scale", "cfg_scale"):
        try:
            setattr(args, name, parse_scale(getattr(args, name), f"--{name}"))
        except ValueError as error:
            parser.error(str(error))
        if isinstance(getattr(args, name), dict) and set(getattr(args, name)) - set(parents):
            parser.error(f"--{name} takes one number or NAME=SCALE pairs for the parents {list(parents)}.")
    check_pipeline_defaults(parser, args, parents)
    return args


def check_pipeline_defaults(parser: argparse.ArgumentParser, args: argparse.Namespace, parents: tuple[str, ...]):
    """The exported pipeline's defaults, checked before training: a folder whose every default call fails (or an
    export that can only fail) is refused now, not after the run."""
    if os.path.isfile(args.pipeline_output_dir):
        parser.error(f"--pipeline_output_dir {args.pipeline_output_dir!r} is a file, not a folder.")
    if args.num_inference_steps < 1 or args.abduction_refinement_steps < 0:
        parser.error("--num_inference_steps must be >= 1 and --abduction_refinement_steps >= 0.")
    for name in ("guidance_scale", "cfg_scale"):
        try:
            per_parent(name, parents, getattr(args, name), None, 0.0, checks.check_scale)
        except ValueError as error:
            parser.error(f"--{name}: {error}")
    unet_config = Path(args.unet_model_name_or_path) / "unet" / "config.json"
    conditional = unet_config.is_file() and json.loads(unet_config.read_text()).get("class_embed_type") == "identity"
    scales = args.cfg_scale.values() if isinstance(args.cfg_scale, dict) else [args.cfg_scale]
    if unet_config.is_file() and not conditional and any(scale != 1 for scale in scales):
        parser.error(f"--cfg_scale needs a conditional UNet; {unet_config} is unconditional.")


def build_predictor(
    args: argparse.Namespace, graph: CausalGraph | None, train_split
) -> AntiCausalClassifier | AntiCausalPredictor:
    """The classifier of the label, or a multi-head predictor of every parent of the graph's image."""
    encoder = dict(
        sample_size=args.resolution,
        in_channels=args.num_channels,
        down_block_types=("DownBlock2D",) * len(args.block_out_channels),
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        norm_num_groups=min(8, args.block_out_channels[0]),
    )
    if graph is None:
        return AntiCausalClassifier(num_classes=args.num_classes or training.num_labels(train_split), **encoder)
    heads = predictor_heads(graph)
    if len(heads) == 1 and next(iter(heads.values()))["type"] == "categorical":  # one class parent: a classifier
        (parent, spec), *_ = heads.items()
        return AntiCausalClassifier(num_classes=spec["num_classes"], parent=parent, **encoder)
    return AntiCausalPredictor(parents=heads, **encoder)


def load_or_build_predictor(args: argparse.Namespace, graph: CausalGraph | None, train_split):
    """New weights, or those of --pretrained_model_name_or_path to fine-tune (its architecture wins)."""
    fresh = build_predictor(args, graph, train_split)
    if args.pretrained_model_name_or_path is None:
        return fresh
    path = args.pretrained_model_name_or_path
    subfolder = None if os.path.isfile(os.path.join(path, "config.json")) else "classifier"
    saved = type(fresh).load_config(path, subfolder=subfolder).get("_class_name")
    if saved != type(fresh).__name__:  # diffusers would load the other kind with freshly drawn weights
        raise ValueError(f"{path} holds an {saved}; this run's graph needs an {type(fresh).__name__} to fine-tune.")
    renamed = {"parent": fresh.config.parent} if isinstance(fresh, AntiCausalClassifier) else {}
    predictor = type(fresh).from_pretrained(path, subfolder=subfolder, **renamed)  # the class parent takes its name
    if predictor.parents != fresh.parents:
        raise ValueError(f"{path} predicts {predictor.parents}, but this run's graph needs {fresh.parents}.")
    return predictor


def predictor_heads(graph: CausalGraph) -> dict[str, dict]:
    """A head per parent of the image; a continuous one is conditioned on the image's continuous parents it causes."""
    heads = graph.parent_specs()
    for name, spec in heads.items():
        if spec["type"] == "continuous":
            children = [c for c in graph.image_parents if name in graph.nodes[c].parents]
            spec["conditions"] = [c for c in children if graph.nodes[c].type == "continuous"]
    return heads


def parent_values(graph: CausalGraph | None, dataset) -> dict:
    """{variable: values} of the image's parents (the `label` column without a graph)."""
    return {"label": dataset["label"]} if graph is None else training.parent_values(graph, dataset)


def load_schedule(args: argparse.Namespace) -> DDIMScheduler:
    """The UNet run's noise schedule; a resumed run refuses a schedule that changed under it."""
    scheduler = DDIMScheduler.from_pretrained(args.unet_model_name_or_path, subfolder="scheduler")
    recorded = os.path.join(args.output_dir, "noise_schedule.json")
    schedule = schedule_of(scheduler)
    if os.path.isfile(recorded) and json.load(open(recorded)) != schedule:
        raise ValueError(
            f"the UNet's noise schedule {schedule} disagrees with the one this classifier was trained on "
            f"({recorded}); train the classifier again for this UNet."
        )
    return scheduler


def schedule_of(scheduler: DDIMScheduler) -> dict:
    return {k: scheduler.config[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")}


@torch.no_grad()
def heldout_metrics(predictor, dataloader, scheduler, device, num_levels: int = 10) -> dict[str, dict]:
    """Per parent, accuracy (categorical) or mean absolute error (continuous, in the variable's units) on the
    held-out split at evenly spaced raw timesteps (fixed noise seed; conditions given their true values)."""
    train_steps = scheduler.config.num_train_timesteps
    levels = sorted({round(i * (train_steps - 1) / (num_levels - 1)) for i in range(num_levels)})
    generator = torch.Generator().manual_seed(0)
    kinds = {name: spec["type"] for name, spec in predictor.parents.items()}
    sums = {name: dict.fromkeys(levels, 0.0) for name in kinds}
    total = 0
    for batch in dataloader:
        clean, values = batch["pixel_values"], training.batch_values(batch)
        total += len(clean)
        for t in levels:
            noise = torch.randn(clean.shape, generator=generator)
            noisy = scheduler.add_noise(clean, noise, torch.full((len(clean),), t))
            estimates = predictor.predict(noisy.to(device), t, given={k: v.to(device) for k, v in values.items()})
            for name, kind in kinds.items():
                estimate, truth = estimates[name].cpu(), values[name]
                error = (estimate == truth).float() if kind == "categorical" else (estimate - truth).abs()
                sums[name][t] += error.sum().item()
    return {
        name: {"metric": "accuracy" if kind == "categorical" else "mae", "levels": {t: sums[name][t] / total
               for t in levels}}
        for name, kind in kinds.items()
    }  # fmt: skip


def main(args: argparse.Namespace):
    accelerator = training.make_accelerator(args)
    scheduler = load_schedule(args)
    split, split_record = training.load_split(args)
    check_same_split(args, split_record)
    graph, _ = training.load_graph(args, split)
    dataloader = training.make_dataloader(split["train"], args, values=parent_values(graph, split["train"]))
    classifier = load_or_build_predictor(args, graph, split["train"])
    conditioned = isinstance(classifier, AntiCausalPredictor)  # its heads may take other parents' values
    classifier, optimizer, dataloader, lr_scheduler, ema = training.prepare_model(
        accelerator, classifier, dataloader, args
    )
    if accelerator.is_main_process:
        training.write_json(os.path.join(args.output_dir, "noise_schedule.json"), schedule_of(scheduler))
    training.start_run(accelerator, args, "train_classifier", split_record)

    def compute_loss(model, batch):
        clean = batch["pixel_values"]
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
        noisy = scheduler.add_noise(clean, torch.randn_like(clean), timesteps)
        values = training.batch_values(batch)
        # Through the (possibly distributed) wrapper, so that gradients are synchronised across processes.
        output = model(noisy, timesteps, conditions=values) if conditioned else model(noisy, timesteps)
        log_likelihoods = accelerator.unwrap_model(model).log_likelihood_of(output, values)
        return -sum(value.mean() for value in log_likelihoods.values())

    steps, seconds = training.train(
        accelerator, args, classifier, optimizer, lr_scheduler, dataloader, compute_loss, ema, script=SCRIPT
    )
    if accelerator.is_main_process:
        final = training.trained_model(accelerator, classifier, ema)
        final.save_pretrained(os.path.join(args.output_dir, "classifier"))
        heldout_values = parent_values(graph, split["heldout"])
        heldout = training.make_dataloader(split["heldout"], args, shuffle=False, values=heldout_values)
        metrics = heldout_metrics(final, heldout, scheduler, accelerator.device)
        training.write_json(os.path.join(args.output_dir, "heldout_metrics.json"), metrics)
        for name, result in metrics.items():
            print(f"held-out {result['metric']} of p_phi({name} | x_t, t):")
            print("\n".join(f"  t = {t:4d}: {value:.3f}" for t, value in result["levels"].items()))
        training.record_run(args, SCRIPT, steps, seconds, num_processes=accelerator.num_processes)
        export_pipeline(final, scheduler, graph, args)
    accelerator.end_training()


def check_same_split(args: argparse.Namespace, split_record: dict):
    """The classifier must hold out the very images the UNet run held out."""
    path = os.path.join(args.unet_model_name_or_path, "split.json")
    if os.path.isfile(path) and json.load(open(path))["heldout_indices"] != split_record["heldout_indices"]:
        raise ValueError(
            f"this data split differs from the UNet run's ({path}); use the same data, --holdout_size and "
            "--split_seed, or held-out images would leak into training."
        )


def export_pipeline(
    classifier: AntiCausalClassifier | AntiCausalPredictor,
    scheduler: DDIMScheduler,
    graph: CausalGraph | None,
    args: argparse.Namespace,
):
    """The complete DiffSCMPipeline folder with its model card; pushed to the Hub when asked."""
    unet_dir = os.path.join(args.unet_model_name_or_path, "unet")
    if not os.path.isdir(unet_dir):
        logger.warning(
            f"No trained UNet in {unet_dir} yet: rerun this command with --resume_from_checkpoint latest once "
            "train_unet.py has finished to write the pipeline folder."
        )
        return
    embedding_dir = os.path.join(args.unet_model_name_or_path, "parent_embedding")
    encoder_dir = os.path.join(args.unet_model_name_or_path, "semantic_encoder")
    pipe = DiffSCMPipeline(
        unet=UNet2DModel.from_pretrained(unet_dir),
        scheduler=scheduler,
        classifier=classifier,
        parent_embedding=ParentEmbedding.from_pretrained(embedding_dir) if os.path.isdir(embedding_dir) else None,
        semantic_encoder=SemanticEncoder.from_pretrained(encoder_dir) if os.path.isdir(encoder_dir) else None,
        causal_graph=graph.to_config() if graph is not None else None,
        guidance_scale=args.guidance_scale,
        cfg_scale=args.cfg_scale,
        num_inference_steps=args.num_inference_steps,
        abduction_refinement_steps=args.abduction_refinement_steps,
    )
    pipe.save_pretrained(args.pipeline_output_dir)
    hub.write_training_record(args.pipeline_output_dir, args.unet_model_name_or_path, args.output_dir)
    model_cards.write_model_card(args.pipeline_output_dir)
    logger.info(f"Saved the DiffSCMPipeline to {args.pipeline_output_dir}")
    if args.push_to_hub:
        url = hub.push_to_hub(args.pipeline_output_dir, args.hub_model_id, args.hub_token, args.hub_private_repo)
        logger.info(f"Pushed to {url}")


if __name__ == "__main__":
    training.run_script(main, parse_args)
