"""Sharing pipelines: training records, model cards from `model_cards/` templates, and uploads to the Hub."""

import importlib.resources
import json
import math
import os
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

from .paths import shipped_checkpoint

DEFAULT_MODEL = "diffscm-mnist"
TEMPLATE = "diffscm_pipeline.md"
ORACLE_TEMPLATE = "oracle.md"
VAE_TEMPLATE = "vae.md"


def load_pipeline(name_or_path: str | None = None, **kwargs):
    """A DiffSCMPipeline from a folder or Hub id (default: the shipped MNIST one), loaded from its resolved folder so
    that `_name_or_path` points at the folder holding `training.json`."""
    from .pipelines import DiffSCMPipeline
    from .pipelines.pipeline_diffscm import local_pipeline_folder

    return DiffSCMPipeline.from_pretrained(
        local_pipeline_folder(name_or_path or shipped_checkpoint(DEFAULT_MODEL)), **kwargs
    )


def write_evaluation(pipeline_dir: str, command: str, report: str):
    """Put an evaluation report (and the command that measured it) into a pipeline folder and re-render its card."""
    if not os.path.isdir(pipeline_dir):
        raise ValueError(f"Writing the model card needs a local pipeline folder, not {pipeline_dir!r}.")
    (Path(pipeline_dir) / "evaluation.md").write_text(f"Measured with `{command}`:\n\n{report}")
    write_model_card(pipeline_dir)


def write_training_record(pipeline_dir: str, unet_run_dir: str, classifier_run_dir: str):
    """`training.json` in the pipeline folder: all commands, the split, the speeds and the predictor's held-out
    accuracy or error by noise level."""
    unet_run = _read_json(unet_run_dir, "training_args.json")
    classifier_run = _read_json(classifier_run_dir, "training_args.json")
    commands = [unet_run["command"], classifier_run["command"]]
    base = unet_run["args"].get("pretrained_model_name_or_path")
    if base and (Path(base) / "training.json").is_file():  # a fine-tuned UNet: the command of its start first
        commands.insert(0, _read_json(base, "training.json")["commands"][0])
    record = {
        "commands": commands,
        "unet_seconds_per_step": round(unet_run["seconds_per_step"], 3),
        "classifier_seconds_per_step": round(classifier_run["seconds_per_step"], 3),
        "split": _read_json(classifier_run_dir, "split.json"),
        "predictor_metrics": _read_json(classifier_run_dir, "heldout_metrics.json"),
    }
    (Path(pipeline_dir) / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def write_model_card(pipeline_dir: str, repo_id: str | None = None) -> ModelCard:
    """Render `README.md` of a pipeline folder from its configs, `training.json` and `evaluation.md` when present."""
    folder = Path(pipeline_dir)
    record = _read_json(folder, "training.json")
    unet = _read_json(folder / "unet", "config.json")
    scheduler, index = (
        _read_json(folder / "scheduler", "scheduler_config.json"),
        _read_json(folder, "model_index.json"),
    )
    split = record["split"]
    graph = _causal_graph(index)
    card_data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=["diffscm", "counterfactual", "causality", "diffusion", "image-to-image"],
        datasets=[split["source"]] if _is_hub_id(split["source"]) else None,
        pipeline_tag="image-to-image",
    )
    card = ModelCard.from_template(
        card_data,
        template_str=_template(TEMPLATE),
        model_name=folder.name,
        repo_id=repo_id or _display_path(folder),
        graph=", ".join(graph.edges),
        usage=_usage_example(graph),
        parents=", ".join(graph.image_parents),
        unet_params=f"{_count_params(folder / 'unet'):,}",
        classifier_params=f"{_count_params(folder / 'classifier'):,}",
        resolution=unet["sample_size"],
        channels=unet["in_channels"],
        num_train_timesteps=scheduler["num_train_timesteps"],
        beta_schedule=scheduler["beta_schedule"],
        guidance_scale=index["guidance_scale"],
        num_inference_steps=index["num_inference_steps"],
        abduction_refinement_steps=index["abduction_refinement_steps"],
        data_source=split["source"],
        num_images=split["num_images"],
        num_train=split["num_train"],
        num_heldout=split["num_heldout"],
        split_seed=split["split_seed"],
        evaluation=_evaluation_section(folder),
        **{k: record[k] for k in ("commands", "unet_seconds_per_step", "classifier_seconds_per_step")},
        predictor_metrics=_predictor_metrics(record),
    )
    card.save(folder / "README.md")
    return card


def write_oracle_card(oracle_dir: str, repo_id: str | None = None) -> ModelCard:
    """Render `README.md` of an oracle folder from its `oracle.json` (command, split, held-out accuracy)."""
    folder = Path(oracle_dir)
    record = _read_json(folder, "oracle.json")
    return _write_judge_card(
        folder, ORACLE_TEMPLATE, "oracle", record, repo_id=repo_id or _display_path(folder),
        heldout_accuracy=record["heldout_accuracy"],
    )  # fmt: skip


def write_vae_card(vae_dir: str) -> ModelCard:
    """Render `README.md` of a VAE folder from its `vae.json` and config."""
    folder = Path(vae_dir)
    record = _read_json(folder, "vae.json")
    return _write_judge_card(
        folder, VAE_TEMPLATE, "vae", record, latent_dim=_read_json(folder, "config.json")["latent_dim"],
        heldout_negative_elbo=record["heldout_negative_elbo"],
    )  # fmt: skip


def _write_judge_card(folder: Path, template: str, tag: str, record: dict, **fields) -> ModelCard:
    """A judge's card: its command, parameter count and split, plus the template's own `fields`."""
    card_data = ModelCardData(library_name="diffusers", license="apache-2.0", tags=["diffscm", "evaluation", tag])
    card = ModelCard.from_template(
        card_data,
        template_str=_template(template),
        model_name=folder.name,
        num_params=f"{_count_params(folder):,}",
        command=record["command"],
        **{key: record["split"][key] for key in ("num_train", "num_heldout", "split_seed", "source")},
        **fields,
    )
    card.save(folder / "README.md")
    return card


def push_to_hub(pipeline_dir: str, repo_id: str | None, token: str | None = None, private: bool = False) -> str:
    """Create (or reuse) the model repo and upload the pipeline folder; returns the repo URL."""
    if not repo_id:
        raise ValueError("--push_to_hub needs --hub_model_id (e.g. your-name/diffscm-mnist).")
    write_model_card(pipeline_dir, repo_id=repo_id)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=pipeline_dir, commit_message="Upload DiffSCMPipeline")
    return str(url)


def _causal_graph(index: dict):
    """The pipeline's graph; folders saved before graphs were recorded have the classifier's label -> image."""
    from .scm import CausalGraph

    return CausalGraph.from_config(index["causal_graph"]) if index.get("causal_graph") else CausalGraph.single_parent()


def _usage_example(graph) -> str:
    """The card's example call: `target=3` for one categorical parent, else an intervention on the first variable."""
    if len(graph.image_parents) == 1:
        return f"out = pipe(image, target=3)  # had this image's {graph.image_parents[0]} been 3"
    node = graph.nodes[graph.order[0]]
    value = 3 if node.type == "categorical" else round(sum(node.range) / 2, 1)
    return f'out = pipe(image, intervention={{"{node.name}": {value}}})  # descendants follow their mechanisms'


def _predictor_metrics(record: dict) -> dict[str, dict]:
    """{parent: {"metric", "levels"}}; records written before multi-parent graphs hold `classifier_accuracy`."""
    if "predictor_metrics" in record:
        return record["predictor_metrics"]
    return {"label": {"metric": "accuracy", "levels": record["classifier_accuracy"]}}


def _is_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not os.path.exists(source)


def _display_path(folder: Path) -> str:
    """The folder as a user would type it here: relative to the working directory when below it."""
    relative = os.path.relpath(folder)
    return str(folder) if relative.startswith("..") else relative


def _template(name: str) -> str:
    return importlib.resources.files("diffscm.model_cards").joinpath(name).read_text(encoding="utf-8")


def _evaluation_section(pipeline_dir: Path) -> str | None:
    path = pipeline_dir / "evaluation.md"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    (weights,) = model_dir.glob("*.safetensors")
    with safe_open(weights, framework="pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def _read_json(folder, name: str) -> dict:
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing.")
    return json.loads(path.read_text(encoding="utf-8"))
