"""Sharing pipelines: loading, training records, evaluation reports in the model card, and uploads to the Hub of
any DiffSCMPipeline folder (with the code plain diffusers needs). The cards themselves: `diffscm.model_cards`."""

import json
import logging
import os
from pathlib import Path

from . import model_cards
from .folder_format import SETTINGS, missing_remote_code, read_index, read_json, upload
from .paths import shipped_checkpoint

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "diffscm-mnist-conditional"
SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16"}


def load_pipeline(name_or_path: str | None = None, device: str = "cpu", dtype: str = "float32", **kwargs):
    """A DiffSCMPipeline from a folder or Hub id (default: the shipped MNIST one) on `device` with weights in
    `dtype`, loaded from its resolved folder so that `_name_or_path` points at the folder holding `training.json`."""
    import torch

    from .pipelines import DiffSCMPipeline
    from .pipelines.folder import resolve

    folder = resolve(name_or_path or shipped_checkpoint(DEFAULT_MODEL))
    return DiffSCMPipeline.from_pretrained(folder, torch_dtype=getattr(torch, dtype), **kwargs).to(device)


def write_evaluation(pipeline_dir: str, command: str, report: str, generation_fidelity: dict | None = None):
    """Put an evaluation report (and the command that measured it) into a pipeline folder and re-render its card;
    the mechanism's `generation_fidelity` also goes into `training.json`, beside the training it measures."""
    folder = Path(pipeline_dir)
    if not folder.is_dir():
        raise ValueError(f"Writing the model card needs a local pipeline folder, not {pipeline_dir!r}.")
    (folder / "evaluation.md").write_text(f"Measured with `{command}`:\n\n{report}")
    if generation_fidelity and (folder / "training.json").is_file():
        record = read_json(folder, "training.json")
        record["generation_fidelity"] = {"command": command, "results": generation_fidelity}
        (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    model_cards.write_model_card(folder)


def write_defaults(
    pipeline_dir: str, command: str, guidance_scale: dict | None = None, cfg_scale: dict | None = None, **settings
):
    """Make measured settings (guidance scales, `integrator`, `num_inference_steps`, ...) a pipeline folder's
    defaults (its weights stay as trained), record the command that chose them in `training.json`, and re-render its
    card."""
    folder = Path(pipeline_dir)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"Saving defaults needs a local pipeline folder, not {pipeline_dir!r}.")
    chosen = {"guidance_scale": guidance_scale, "cfg_scale": cfg_scale} | settings
    allowed = set(SETTINGS) - {"causal_graph"}
    unknown = sorted(set(chosen) - allowed)
    if unknown:
        raise ValueError(f"{unknown} are not settings a pipeline's defaults hold ({sorted(allowed)}).")
    index = read_json(folder, "model_index.json") | {key: value for key, value in chosen.items() if value is not None}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if (folder / "training.json").is_file():
        record = read_json(folder, "training.json") | {"defaults_command": command}
        (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    model_cards.write_model_card(folder)


def write_training_record(pipeline_dir: str, unet_run_dir: str, classifier_run_dir: str):
    """`training.json` in the pipeline folder: all commands in the order they ran (the predictor's base pipeline's,
    the UNet's that are not among them, the predictor's own), the split, the speeds and the predictor's held-out
    accuracy or error by noise level."""
    classifier_run = read_json(classifier_run_dir, "training_args.json")
    unet_run = read_json(unet_run_dir, "training_args.json")
    base = classifier_run["args"].get("pretrained_model_name_or_path")
    commands = []
    if base and (Path(base) / "training.json").is_file():  # a fine-tuned predictor: the runs that made it, first
        commands = read_json(base, "training.json")["commands"]
    commands += [c for c in unet_commands(unet_run_dir) if c not in commands]
    commands.append(classifier_run["command"])
    record = {
        "commands": commands,
        "unet_seconds_per_step": _rounded(unet_run["seconds_per_step"]),
        "unet_images_seen": unet_run.get("images_seen"),
        "classifier_seconds_per_step": _rounded(classifier_run["seconds_per_step"]),
        "split": read_json(classifier_run_dir, "split.json"),
        "predictor_metrics": read_json(classifier_run_dir, "heldout_metrics.json"),
    }
    (Path(pipeline_dir) / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def _rounded(seconds: float | None) -> float | None:
    """A measured speed to the millisecond; None for an export of a checkpoint whose run measured none here."""
    return None if seconds is None else round(seconds, 3)


DATA_RECORDS = ("colour_mnist.json", "redraw.json")  # written beside the data by make_colour_mnist.py, redraw_...


def data_commands(split: dict) -> list[str]:
    """The commands that wrote a run's data folders (its source and extra training data), where they recorded one."""
    sources = [split.get("source", ""), *split.get("extra_train_sources", [])]
    return [
        read_json(source, name)["command"]
        for source in sources
        for name in DATA_RECORDS
        if source and (Path(source) / name).is_file()
    ]


def unet_commands(run_dir: str | os.PathLike) -> list[str]:
    """The commands that remake a train_unet.py run: the data it was made from or added (make_colour_mnist.py,
    redraw_morphomnist.py), the run it fine-tuned (a pipeline folder's UNet commands, or another run's,
    recursively), then its own."""
    run = read_json(run_dir, "training_args.json")
    commands = data_commands(read_json(run_dir, "split.json"))
    base = run["args"].get("pretrained_model_name_or_path")
    if base and (Path(base) / "training.json").is_file():  # a pipeline folder: all but its predictor's command
        commands += [c for c in read_json(base, "training.json")["commands"][:-1] if c not in commands]
    elif base and (Path(base) / "training_args.json").is_file():  # another train_unet.py run
        commands += [c for c in unet_commands(base) if c not in commands]
    return commands + [run["command"]]


def push_to_hub(
    pipeline_dir: str | os.PathLike,
    repo_id: str | None,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """
    Upload any DiffSCMPipeline folder to the Hub model repo `repo_id` (created if needed) with its model card and
    the code that `DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)` needs; returns the repo URL.

    A folder that lacks that code (such as the shipped `checkpoints/diffscm-mnist`, whose code files only import the
    installed diffscm) is staged rather than changed: loaded, saved with its code into a temporary folder with its
    `training.json` and `evaluation.md`, and uploaded from there. A folder that has it gets its card re-rendered for
    `repo_id` and is uploaded as it is.
    """
    if not repo_id:
        raise ValueError(
            "Pushing a pipeline needs a Hub repo id such as 'your-name/diffscm-mnist' (--hub_model_id in the "
            "training scripts)."
        )
    folder = Path(pipeline_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"No such pipeline folder: {str(pipeline_dir)!r}.")
    read_index(folder)  # a ValueError that names what is wrong when it is not a pipeline folder
    options = {"token": token, "private": private, "commit_message": commit_message, "create_pr": create_pr}
    missing = missing_remote_code(folder)
    if missing:  # loaded with each component in the dtype its weights were saved in, and pushed with its code
        logger.info(f"{folder} lacks the pipeline's own code ({', '.join(missing)}): staging it for the upload.")
        from .pipelines import DiffSCMPipeline

        return DiffSCMPipeline.from_pretrained(str(folder), torch_dtype=_saved_dtypes(folder)).push_to_hub(
            repo_id, **options
        )
    model_cards.write_model_card(folder, repo_id=repo_id)
    return upload(folder, repo_id, **options)


def _saved_dtypes(folder: Path) -> dict:
    """{component: torch dtype} of the half-precision components' saved weights (float32 for the rest), so that
    staging does not widen them."""
    import torch
    from safetensors import safe_open

    dtypes = {"default": torch.float32}
    for component in ("unet", "classifier", "parent_embedding", "semantic_encoder", "colour_map"):
        for weights in sorted((folder / component).glob("*.safetensors"))[:1]:
            with safe_open(weights, framework="pt") as f:
                saved = {f.get_slice(name).get_dtype() for name in f.keys()}
            if len(saved) == 1 and saved <= set(SAFETENSORS_DTYPES):
                dtypes[component] = getattr(torch, SAFETENSORS_DTYPES[saved.pop()])
    return dtypes
