"""The DiffSCMPipeline folder format, read without torch: its components and settings with their defaults,
`model_index.json` read and checked, the graph of a folder that records none, its records, and the code files that
plain diffusers needs (`trust_remote_code=True`). The pipeline (`diffscm.pipelines.folder`), the model cards and
`diffscm.hub` all read a folder through this module."""

import json
import os
import re
import shutil
from pathlib import Path

from huggingface_hub import HfApi

from diffscm.scm import CausalGraph

COMPONENTS = ("unet", "scheduler", "classifier", "parent_embedding", "semantic_encoder", "colour_map")
PREDICTOR_CLASSES = ("AntiCausalClassifier", "AntiCausalPredictor")
EXPLAINED_CLASSIFIER_SCALE = 8.0  # measured: docs/evaluation-mnist-vit-conditional (the ViT flips 0.995 at 8)
DEFAULTS = {  # every call's settings where a folder records none (guidance_scale: see `default_guidance_scale`)
    "causal_graph": None,
    "guidance_scale": None,
    "cfg_scale": 1.0,
    "num_inference_steps": 50,
    "abduction_refinement_steps": 0,
    "explained_classifier_scale": EXPLAINED_CLASSIFIER_SCALE,
    "integrator": "ddim",
    "hold_unchanged_parents": True,
}
INTEGRATORS = ("ddim", "bdia", "residual")  # DDIM refined by fixed point; BDIA-DDIM; DDIM with abducted residuals
SETTINGS = tuple(DEFAULTS)
RECORDS = ("training.json", "evaluation.md")  # a folder's own records of how its pipeline was made and measured
CODE_LIBRARIES = ("diffusers", "transformers")  # components whose code plain diffusers already has


def per_parent(name: str, parents, default, given, fill: float, check=lambda name, value: float(value)) -> dict:
    """{parent: scale} from a scale or a per-parent dict, the `given` one(s) over the `default` (`fill` for parents
    named by neither), each value through `check(name, value)`; a name that is not a parent is refused."""
    scales = {}
    for scale in (default, given):
        if scale is None:
            continue
        if not isinstance(scale, dict):
            scale = dict.fromkeys(parents, scale)
        unknown = set(scale) - set(parents)
        if unknown:
            raise ValueError(f"`{name}` names {sorted(unknown)}, not parents of the image {list(parents)}.")
        scales |= {parent: check(name, value) for parent, value in scale.items()}
    return {parent: scales.get(parent, fill) for parent in parents}


def default_guidance_scale(has_predictor: bool) -> float:
    """The anti-causal guidance scale where none is recorded: 1 with a predictor to guide, else 0."""
    return 1.0 if has_predictor else 0.0


def unet_passes(num_inference_steps: int, refinements: int, integrator: str, cfg_passes: int = 0) -> int:
    """UNet evaluations of one counterfactual (abduction and prediction): DDIM refines every inversion step, BDIA
    only its first (then one pass per step each way), the residual integrator every step and reads the noise of the
    state reached (one more pass in all where K = 0, whose first step takes one fixed-point pass)."""
    if integrator == "bdia":
        abduction = num_inference_steps + refinements
    else:
        abduction = num_inference_steps * (1 + refinements) + (integrator == "residual" and refinements == 0)
    return (abduction + num_inference_steps) * (1 + cfg_passes)


def settings(index: dict) -> dict:
    """Every setting of a checked `model_index.json`, the defaults filled in where it records none."""
    found = DEFAULTS | {key: index[key] for key in SETTINGS if key in index}
    if found["guidance_scale"] is None:
        found["guidance_scale"] = default_guidance_scale(recorded(index, "classifier"))
    return found


def read_json(folder: str | os.PathLike, name: str) -> dict:
    """A JSON file of a folder, refused with its path named when it is missing or corrupt."""
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is corrupt: {error}") from error


def recorded(index: dict, name: str) -> bool:
    """Whether `model_index.json` records component `name` (`[library, class]`, not `[null, null]`)."""
    spec = index.get(name)
    return isinstance(spec, list) and len(spec) == 2 and spec[-1] is not None


def read_index(folder: str | os.PathLike) -> dict:
    """`model_index.json` of a DiffSCMPipeline folder, checked: its class, its components and their folders, and no
    key that the pipeline does not know."""
    path = Path(folder) / "model_index.json"
    if not path.is_file():
        raise ValueError(f"{folder} is not a DiffSCMPipeline folder: it has no model_index.json.")
    index = read_json(folder, "model_index.json")
    if not isinstance(index, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(index).__name__}.")
    class_name = index.get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, list) else class_name
    if class_name != "DiffSCMPipeline" or {"unet", "scheduler"} - set(index):
        raise ValueError(f"{folder} holds a {class_name} pipeline, not a DiffSCMPipeline (with unet and scheduler).")
    unknown = {key for key in index if not key.startswith("_")} - set(COMPONENTS) - set(SETTINGS)
    if unknown:
        known = [*COMPONENTS, *SETTINGS]
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; a DiffSCMPipeline knows {known}.")
    for name in COMPONENTS:
        spec = index.get(name)
        if spec is not None and not (isinstance(spec, list) and len(spec) == 2):
            raise ValueError(f"{path}: {name!r} must be [library, class] or null, got {spec!r}.")
    predictor = (index.get("classifier") or [None, None])[-1]
    if predictor is not None and predictor not in PREDICTOR_CLASSES:
        raise ValueError(f"{path}: unknown anti-causal predictor {predictor!r}; expected one of {PREDICTOR_CLASSES}.")
    for name in COMPONENTS:
        if recorded(index, name) and not (Path(folder) / name).is_dir():
            raise ValueError(f"{folder} records a {name} ({index[name][-1]}) but has no {name}/ folder.")
    return index


def causal_graph(config: dict | None, parent_specs: dict[str, dict]) -> CausalGraph:
    """A pipeline's graph: as configured, or, for a folder saved before graphs were recorded, the single categorical
    parent -> image of its predictor or embedding (`parent_specs`, `{name: {"num_classes": K}}`)."""
    if config:
        return CausalGraph.from_config(config)
    if not parent_specs:
        raise ValueError("A DiffSCMPipeline needs an anti-causal `classifier`, a `parent_embedding`, or both.")
    (name, spec), *_ = parent_specs.items()
    return CausalGraph.single_parent(name, spec.get("num_classes", 10))


_INSTALLED_PACKAGE = re.compile(r"^\s*(from|import)\s+diffscm\b", re.M)


def missing_remote_code(pipeline_dir: str | os.PathLike) -> list[str]:
    """The code files that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` needs and the folder
    lacks (the pipeline's module, its custom components' modules in their sub-folders and what they import
    relatively), or holds only as a shim that imports the installed diffscm ([`installed_code_shims`]);
    `["model_index.json"]` when it does not name the pipeline's module. Empty: plain diffusers loads the folder
    without diffscm."""
    folder = Path(pipeline_dir)
    index = read_json(folder, "model_index.json")
    class_name = index.get("_class_name")
    if not (isinstance(class_name, list) and len(class_name) == 2 and class_name[0]):
        return ["model_index.json"]
    needed = [Path(f"{class_name[0]}.py")] + [
        Path(name, f"{spec[0]}.py")
        for name, spec in index.items()
        if name in COMPONENTS and recorded(index, name) and spec[0] not in CODE_LIBRARIES
    ]
    missing, seen = [], set()
    while needed:
        path = needed.pop(0)
        if path in seen:
            continue
        seen.add(path)
        source = (folder / path).read_text(encoding="utf-8") if (folder / path).is_file() else ""
        if not source or _INSTALLED_PACKAGE.search(source):
            missing.append(path.as_posix())
            continue
        needed += [path.parent / f"{module}.py" for module in re.findall(r"^\s*from\s+\.(\w+)\s+import", source, re.M)]
    return missing


def installed_code_shims(pipeline_dir: str | os.PathLike) -> list[str]:
    """The code files of a folder that import the installed diffscm instead of holding its code (the shipped
    folders': plain diffusers loads them where diffscm is installed; an upload stages the whole code)."""
    folder = Path(pipeline_dir)
    return [path for path in missing_remote_code(folder) if (folder / path).is_file()]


def copy_records(source: str | os.PathLike, pipeline_dir: str | os.PathLike):
    """The `training.json` and `evaluation.md` of a local pipeline folder `source` (if any) into `pipeline_dir`."""
    for name in RECORDS:
        if source and (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(pipeline_dir) / name)


def upload(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """A complete pipeline folder (code and card written) uploaded to the Hub model repo `repo_id`, created if
    needed; returns the repo URL."""
    api = HfApi(token=token)
    url = api.create_repo(repo_id, exist_ok=True, private=bool(private), repo_type="model")
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message=commit_message or "Upload DiffSCMPipeline",
        create_pr=create_pr,
        ignore_patterns=["**/__pycache__/**", "*.pyc"],
    )
    return str(url)
