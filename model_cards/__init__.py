"""Model cards: the `README.md` of a pipeline folder and of the judges' folders, rendered from the folder's own files
(configs, weights, `training.json`, `evaluation.md`) with the Jinja2 templates next to this module
(huggingface_hub's `ModelCard.from_template`).

A pipeline card renders for any `DiffSCMPipeline` folder, whichever way it was built: by hand and saved, exported by
a training script, or loaded, changed and saved again; what the folder does not record, the card says is not recorded.
This module only reads files: it imports no model or pipeline code (floor 1; the folder format from
`diffscm.folder_format`).
"""

import math
import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from safetensors import safe_open

from diffscm.folder_format import (
    causal_graph,
    installed_code_shims,
    missing_remote_code,
    per_parent,
    read_json,
    recorded,
    settings,
    unet_passes,
)
from diffscm.scm import CausalGraph, Node

PIPELINE_TEMPLATE = "diffscm_pipeline.md"
ORACLE_TEMPLATE = "oracle.md"
VAE_TEMPLATE = "vae.md"
JUDGES_TEMPLATE = "judges.md"
IMAGE_CLASSIFIER_TEMPLATE = "image_classifier.md"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def write_model_card(pipeline_dir: str | os.PathLike, repo_id: str | None = None) -> ModelCard:
    """Render the `README.md` of a pipeline folder from its files (see [`render_model_card`]) and save it there."""
    card = render_model_card(pipeline_dir, repo_id=repo_id)
    card.save(Path(pipeline_dir) / "README.md")
    return card


def render_model_card(pipeline_dir: str | os.PathLike, repo_id: str | None = None) -> ModelCard:
    """
    The card of any DiffSCMPipeline folder: its mechanism (conditional with a `parent_embedding/`, else
    classifier-guided), causal graph, components with their parameter counts, defaults, usage with diffscm and with
    plain diffusers, and, when the folder holds them, `training.json` (data, commands, the predictor's held-out scores)
    and `evaluation.md`; what is missing is named as not recorded.

    Args:
        pipeline_dir: a folder written by `DiffSCMPipeline.save_pretrained`.
        repo_id: the Hub id that the usage examples load (default: the folder as typed from here).
    """
    folder = Path(pipeline_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"No such pipeline folder: {str(pipeline_dir)!r}.")
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{folder} is not a DiffSCMPipeline folder: it has no model_index.json.")
    index = read_json(folder, "model_index.json")
    unet = read_json(folder / "unet", "config.json")
    scheduler = read_json(folder / "scheduler", "scheduler_config.json")
    components = ("classifier", "parent_embedding", "semantic_encoder", "colour_map")
    present = {name: recorded(index, name) and (folder / name).is_dir() for name in components}
    conditional, has_classifier = present["parent_embedding"], present["classifier"]
    graph = causal_graph(index.get("causal_graph"), _parent_specs(folder, has_classifier, conditional))
    parents = graph.image_parents
    defaults = settings(index)
    guidance, cfg = defaults["guidance_scale"], defaults["cfg_scale"]
    steps, refinements = defaults["num_inference_steps"], defaults["abduction_refinement_steps"]
    cfg_passes = sum(scale != 1 for scale in per_parent("cfg_scale", parents, cfg, None, 1.0).values())
    record = read_json(folder, "training.json") if (folder / "training.json").is_file() else None
    split = (record or {}).get("split")
    card_data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=["diffscm", "counterfactual", "causality", "diffusion", "image-to-image"]
        + ["classifier-free-guidance" if conditional else "classifier-guidance"],
        datasets=_hub_datasets(split),
        pipeline_tag="image-to-image",
    )
    return ModelCard.from_template(
        card_data,
        template_str=_template(PIPELINE_TEMPLATE),
        model_name=repo_id.rsplit("/", 1)[-1] if repo_id else folder.resolve().name,
        repo_id=repo_id or _display_path(folder),
        conditional=conditional,
        has_classifier=has_classifier,
        graph=", ".join(graph.edges),
        variables=[_variable_row(graph.nodes[name], unet, conditional) for name in graph.order],
        usage=_usage_example(graph, has_classifier),
        parents=", ".join(parents),
        unet_params=_format_count(_count_params(folder / "unet")),
        classifier_params=_format_count(_count_params(folder / "classifier")) if has_classifier else None,
        embedding_params=_format_count(_count_params(folder / "parent_embedding")) if conditional else None,
        semantic_latent_dim=present["semantic_encoder"]
        and read_json(folder / "semantic_encoder", "config.json")["latent_dim"],
        semantic_params=present["semantic_encoder"] and _format_count(_count_params(folder / "semantic_encoder")),
        colour_reference=present["colour_map"] and _colour_reference(folder / "colour_map", graph),
        colour_map_params=present["colour_map"] and _format_count(_count_params(folder / "colour_map")),
        resolution=unet["sample_size"],
        channels=unet["in_channels"],
        num_train_timesteps=scheduler.get("num_train_timesteps", 1000),
        beta_schedule=scheduler.get("beta_schedule", "linear"),
        guidance_scale=_format_scale(guidance, parents, 0.0),
        cfg_scale=_format_scale(cfg, parents, 1.0),
        num_inference_steps=steps,
        abduction_refinement_steps=refinements,
        integrator=defaults["integrator"],
        hold_unchanged_parents=defaults["hold_unchanged_parents"] if conditional and len(parents) > 1 else None,
        unet_evaluations=unet_passes(steps, refinements, defaults["integrator"], cfg_passes if conditional else 0),
        missing_code=missing_remote_code(folder),
        shims=installed_code_shims(folder),
        training=record,
        split=split,
        commands=(record or {}).get("commands"),
        defaults_command=(record or {}).get("defaults_command"),
        unet_seconds_per_step=(record or {}).get("unet_seconds_per_step"),
        classifier_seconds_per_step=(record or {}).get("classifier_seconds_per_step"),
        colour_map_metrics=(record or {}).get("colour_map_metrics"),
        colour_map_seconds_per_step=(record or {}).get("colour_map_seconds_per_step"),
        predictor_metrics=_predictor_metrics(record) if record else None,
        evaluation=_evaluation_section(folder),
    )


def _colour_reference(folder: Path, graph: CausalGraph) -> str:
    """The colour map's parents at their reference values, e.g. `hue` (reference 0.5) or `color` (reference red)."""
    shown = []
    for name, value in read_json(folder, "config.json")["reference"].items():
        classes = graph.nodes[name].classes
        shown.append(f"`{name}` (reference {classes[value] if classes else f'{value:g}'})")
    return ", ".join(shown)


def write_oracle_card(oracle_dir: str | os.PathLike, repo_id: str | None = None) -> ModelCard:
    """Render `README.md` of an oracle folder from its `oracle.json` (command, split, held-out accuracy)."""
    folder = Path(oracle_dir)
    record = read_json(folder, "oracle.json")
    return _write_judge_card(
        folder,
        ORACLE_TEMPLATE,
        "oracle",
        record,
        "diffscm",
        repo_id=repo_id or _display_path(folder),
        heldout_accuracy=record["heldout_accuracy"],
    )


def write_judges_card(judges_dir: str | os.PathLike, repo_id: str | None = None) -> ModelCard:
    """Render `README.md` of a judges folder from its `judges.json` (command, split, own held-out errors)."""
    folder = Path(judges_dir)
    record = read_json(folder, "judges.json")
    errors = "\n".join(f"- {name.replace('_', ' ')}: **{value:.4g}**" for name, value in record["heldout"].items())
    return _write_judge_card(
        folder,
        JUDGES_TEMPLATE,
        "judges",
        record,
        "diffscm",
        repo_id=repo_id or _display_path(folder),
        errors=errors,
        edges=", ".join(CausalGraph.from_config(record["causal_graph"]).edges),
    )


def write_vae_card(vae_dir: str | os.PathLike) -> ModelCard:
    """Render `README.md` of a VAE folder from its `vae.json` and config."""
    folder = Path(vae_dir)
    record = read_json(folder, "vae.json")
    return _write_judge_card(
        folder,
        VAE_TEMPLATE,
        "vae",
        record,
        "diffscm",
        latent_dim=read_json(folder, "config.json")["latent_dim"],
        heldout_negative_elbo=record["heldout_negative_elbo"],
    )


def write_image_classifier_card(folder: str | os.PathLike, repo_id: str | None = None) -> ModelCard:
    """Render `README.md` of a transformers classifier folder from its `image_classifier.json` and config."""
    folder = Path(folder)
    record = read_json(folder, "image_classifier.json")
    return _write_judge_card(
        folder,
        IMAGE_CLASSIFIER_TEMPLATE,
        "image-classification",
        record,
        "transformers",
        "image-classification",
        repo_id=repo_id or _display_path(folder),
        heldout_accuracy=record["heldout_accuracy"],
        architecture=read_json(folder, "config.json")["architectures"][0],
    )


def _write_judge_card(
    folder: Path, template: str, tag: str, record: dict, library: str, pipeline_tag: str | None = None, **fields
) -> ModelCard:
    """A judge's card: its command, parameter count and split, plus the template's own `fields`. `library`: what
    loads the folder (diffscm for its own `ModelMixin` classes, which diffusers alone cannot build)."""
    card_data = ModelCardData(
        library_name=library,
        license="apache-2.0",
        tags=["diffscm", "evaluation", tag],
        datasets=_hub_datasets(record["split"]),
        pipeline_tag=pipeline_tag,
    )
    card = ModelCard.from_template(
        card_data,
        template_str=_template(template),
        model_name=folder.name,
        num_params=_format_count(_count_params(folder)),
        command=record["command"],
        **{key: record["split"][key] for key in ("num_train", "num_heldout", "split_seed", "source")},
        **fields,
    )
    card.save(folder / "README.md")
    return card


def _parent_specs(folder: Path, has_classifier: bool, conditional: bool) -> dict[str, dict]:
    """The parents that the predictor (or the embedding) of a folder without a recorded graph was built for."""
    if has_classifier:
        config = read_json(folder / "classifier", "config.json")
        return config.get("parents") or {config.get("parent", "label"): {"num_classes": config.get("num_classes", 10)}}
    if conditional:
        return read_json(folder / "parent_embedding", "config.json")["parents"]
    return {"label": {"num_classes": 10}}


def _variable_row(node: Node, unet: dict, conditional: bool) -> dict:
    """One row of the card's table of variables: type, values, parents and mechanism."""
    if node.type == "image":
        values = f"{unet['sample_size']}x{unet['sample_size']}, {unet['in_channels']} channel(s)"
        mechanism = (
            "the UNet, eps_theta(x_t, t, pa)"
            if conditional
            else "the UNet, eps_theta(x_t, t), guided by the anti-causal predictor"
        )
    else:
        values = (
            (f"{node.num_classes} classes" + (f" ({', '.join(node.classes)})" if node.classes else ""))
            if node.type == "categorical"
            else f"[{_g(node.range[0])}, {_g(node.range[1])}]"
        )
        mechanism = _mechanism_formula(node)
    return {
        "name": node.name,
        "type": node.type,
        "domain": values,
        "parents": ", ".join(node.parents),
        "mechanism": mechanism,
    }


def _mechanism_formula(node: Node) -> str:
    """`v = f(pa, u)` of a non-image node, with its fitted or given numbers."""
    m = node.mechanism
    if m.kind == "identity":
        return "root: its value is its own noise" if not node.parents else "identity"
    if m.kind == "flow":
        return f"a conditional neural spline flow of u given {', '.join(node.parents)} (fitted, zuko NSF)"
    if m.kind == "gumbel_max":
        return f"argmax over classes of logits({', '.join(node.parents)}) + u, u Gumbel (Gumbel-max, fitted)"
    terms = [_g(m.bias)] if m.bias else []
    terms += [_mechanism_term(weight, parent) for parent, weight in m.weights.items()]
    terms += [f"{_g(m.scale)} u".removeprefix("1 ")]
    linear = " + ".join(terms).replace("+ -", "- ")
    if m.kind == "affine":
        return linear
    return f"{_g(m.low)} + {_g(m.high - m.low)} sigmoid({linear})"


def _mechanism_term(weight, parent: str) -> str:
    """`2 thickness`, or for a categorical parent (one-hot) `w[digit]` with w listed per class."""
    if isinstance(weight, tuple):
        return f"w[{parent}] (w = {', '.join(_g(w) for w in weight)})"
    return f"{_g(weight)} {parent}".removeprefix("1 ")


def _usage_example(graph: CausalGraph, has_classifier: bool) -> str:
    """The card's example call: `target=` for one categorical parent, else an intervention on the image's first
    parent; without an anti-causal predictor the factual values it needs are given, since none can be read."""
    parents = graph.image_parents
    first = graph.nodes[next(name for name in graph.order if name in parents)]
    if len(parents) == 1 and first.type == "categorical":
        value = _class_example(first, min(3, first.num_classes - 1))
        call = f"out = pipe(image, target={value}"
        comment = f"had this image's {first.name} been {value.strip(chr(34))}"
    else:
        value = (
            _class_example(first, min(3, first.num_classes - 1))
            if first.type == "categorical"
            else _g(round(sum(first.range) / 2, 1))
        )
        call = f'out = pipe(image, intervention={{"{first.name}": {value}}}'
        comment = "descendants follow their mechanisms"
    if not has_classifier:  # the factual values of the parents and of what the intervention changes
        changed = graph.descendants(first.name) - {graph.image.name}
        needed = set(parents) | changed | {p for name in changed for p in graph.nodes[name].parents}
        factual = ", ".join(f'"{name}": {_example_value(graph.nodes[name])}' for name in graph.order if name in needed)
        call += f", factual_values={{{factual}}}"
        comment = "no predictor reads factual values from an image here"
    return f"{call})  # {comment}"


def _example_value(node: Node):
    return _class_example(node, 0) if node.type == "categorical" else _g(node.range[0])


def _class_example(node: Node, index: int) -> str:
    """A categorical value as a card's example writes it: the class name in quotes where the node has names."""
    return f'"{node.classes[index]}"' if node.classes else str(index)


def _format_scale(scale, parents: tuple[str, ...], fill: float) -> str:
    if not isinstance(scale, dict):
        return str(float(scale))
    return ", ".join(f"{parent} {value}" for parent, value in per_parent("scale", parents, scale, None, fill).items())


def _predictor_metrics(record: dict) -> dict[str, dict] | None:
    """{parent: {"metric", "levels"}}; records written before multi-parent graphs hold `classifier_accuracy`."""
    if "predictor_metrics" in record:
        return record["predictor_metrics"] or None
    if "classifier_accuracy" in record:
        return {"label": {"metric": "accuracy", "levels": record["classifier_accuracy"]}}
    return None


def _g(value: float) -> str:
    return f"{value:g}"


def _hub_datasets(split: dict | None) -> list[str] | None:
    """The Hub data set behind a recorded split: its own id, or MNIST for the repository's bundled digits,
    Morpho-MNIST (the morphometrically transformed MNIST digits) and Colour-MNIST (the bundled digits coloured);
    None for any other local folder."""
    source = (split or {}).get("source")
    if source == "mnist-bundled" or (source and Path(source).name.startswith(("morphomnist", "colour-mnist"))):
        return ["ylecun/mnist"]
    return [source] if source and _is_hub_id(source) else None


def _is_hub_id(source: str) -> bool:
    return source.count("/") == 1 and not source.startswith((".", "/", "~")) and not os.path.exists(source)


def _display_path(folder: Path) -> str:
    """The folder as a user would type it here: relative to the working directory when below it."""
    relative = os.path.relpath(folder)
    return str(folder) if relative.startswith("..") else relative


def _template(name: str) -> str:
    return (Path(__file__).parent / name).read_text(encoding="utf-8")


def _evaluation_section(pipeline_dir: Path) -> str | None:
    path = pipeline_dir / "evaluation.md"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _count_params(model_dir: Path) -> int | None:
    """Parameters in a model folder's safetensors weights (all shards); None when they are not safetensors."""
    files = [model_dir / WEIGHTS] if (model_dir / WEIGHTS).is_file() else sorted(model_dir.glob("*-of-*.safetensors"))
    files = files or sorted(model_dir.glob("*.safetensors"))[:1]
    if not files:
        return None
    total = 0
    for weights in files:
        with safe_open(weights, framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


def _format_count(count: int | None) -> str:
    return f"{count:,}" if count is not None else "an unknown number of"
