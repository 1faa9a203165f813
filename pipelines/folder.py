"""The DiffSCMPipeline folder format, in one place: a local folder or Hub id resolved, `model_index.json` read and
checked, the components loaded (safetensors only, every tensor accounted for), and the code that plain diffusers
needs (`trust_remote_code=True`) written by walking the pipeline's imports, and checked."""

import importlib
import importlib.util
import inspect
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel
from huggingface_hub import snapshot_download

from diffscm.folder_format import COMPONENTS, RECORDS, SETTINGS, recorded
from diffscm.models.anticausal import AntiCausalClassifier, AntiCausalPredictor
from diffscm.models.colour_map import ParentColourMap
from diffscm.models.parent_embedding import ParentEmbedding
from diffscm.models.semantic_encoder import SemanticEncoder

PREDICTORS = {cls.__name__: cls for cls in (AntiCausalClassifier, AntiCausalPredictor)}
MODELS = {
    "unet": UNet2DModel,
    "parent_embedding": ParentEmbedding,
    "semantic_encoder": SemanticEncoder,
    "colour_map": ParentColourMap,
}  # the classifier's class is recorded
SCHEDULER = "scheduler"
DOWNLOAD_KEYWORDS = ("revision", "cache_dir", "token", "local_files_only")
_IMPORT = re.compile(r"^from\s+(diffscm(?:\.\w+)*|\.+\w*(?:\.\w+)*)\s+import", re.MULTILINE)


def resolve(name_or_path: str, **download) -> str:
    """A pipeline folder as is, or a Hub id's local snapshot (downloaded, or from the cache offline); diffusers' own
    download step refuses non-diffusers component libraries, so the id is resolved here."""
    if os.path.isdir(os.path.expanduser(name_or_path)):
        return os.path.expanduser(name_or_path)
    first = name_or_path.split("/")[0]
    if (
        os.path.exists(name_or_path)
        or name_or_path.startswith((".", "/", "~"))
        or name_or_path.count("/") > 1
        or ("/" in name_or_path and os.path.isdir(first))
    ):
        raise FileNotFoundError(f"No such pipeline folder: {name_or_path!r}.")
    try:
        return snapshot_download(name_or_path, **download)
    except Exception as error:  # the hub client raises many kinds; all mean the same to the user
        raise OSError(
            f"{name_or_path!r} is not a local folder, and as a Hub id it could not be fetched: {error}"
        ) from error


def loading_options(kwargs: dict) -> tuple[dict, dict, object]:
    """diffusers' loading keywords taken out of `kwargs`: the download ones, the models' (`variant`,
    `low_cpu_mem_usage`) and the dtype (`torch_dtype` or `dtype`: a torch dtype, its name, or `{component: dtype,
    "default": dtype}`). Keywords that would load something else than what the folder holds are refused."""
    download = {key: kwargs.pop(key) for key in DOWNLOAD_KEYWORDS if key in kwargs}
    if "dtype" in kwargs and "torch_dtype" in kwargs:
        raise TypeError("Give `dtype` or `torch_dtype`, not both.")
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", None))
    dtype = {k: _dtype(v) for k, v in dtype.items()} if isinstance(dtype, dict) else _dtype(dtype)
    if kwargs.pop("use_safetensors", True) is not True:
        raise ValueError("DiffSCMPipeline loads safetensors weights only (pickled .bin weights can run code).")
    if kwargs.pop("device_map", None) is not None:
        raise ValueError("`device_map` is not supported: load the pipeline, then move it with `.to(device)`.")
    model_options = {key: kwargs.pop(key) for key in ("variant", "low_cpu_mem_usage") if key in kwargs}
    kwargs.pop("trust_remote_code", None)  # DiffSCMPipeline is the folder's code: nothing remote to trust
    if kwargs.pop("safety_checker", None) is not None or kwargs.pop("requires_safety_checker", False):
        raise ValueError("A DiffSCMPipeline has no safety checker; load it without one.")
    unknown = sorted(set(kwargs) - set(COMPONENTS) - set(SETTINGS))
    if unknown:
        accepted = [*DOWNLOAD_KEYWORDS, "torch_dtype", "dtype", "variant", "low_cpu_mem_usage", *COMPONENTS, *SETTINGS]
        raise TypeError(
            f"DiffSCMPipeline.from_pretrained does not take {unknown} (custom_pipeline: plain diffusers' "
            f"DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) loads the folder's code); it takes "
            f"{accepted}."
        )
    return download, {key: value for key, value in model_options.items() if value is not None}, dtype


def load_components(folder: str, index: dict, dtype, skip=(), **options) -> dict:
    """Every component that `index` records and `skip` does not name, from its sub-folder of `folder`."""
    components = {}
    for name in COMPONENTS:
        if name in skip or not recorded(index, name):
            continue
        if name == "scheduler":
            components[name] = _load(folder, name, lambda: DDIMScheduler.from_pretrained(folder, subfolder=SCHEDULER))
            continue
        cls = PREDICTORS[index[name][1]] if name == "classifier" else MODELS[name]
        component_dtype = dtype.get(name, dtype.get("default")) if isinstance(dtype, dict) else dtype
        components[name] = load_model(cls, folder, name, component_dtype, **options)
    check_recorded_training(folder, components)
    return components


def check_recorded_training(folder: str, components: dict):
    """A folder's UNet size, schedule and prediction type against its recorded training (`training.json`'s last
    train_unet.py run): a `sample_size`, `num_train_timesteps` or `prediction_type` edited since would run without a
    word and draw garbage."""
    record = Path(folder) / "training.json"
    commands = json.loads(record.read_text()).get("commands", []) if record.is_file() else []
    runs = [shlex.split(command) for command in commands if "train_unet.py" in command]
    if not runs or "unet" not in components or "scheduler" not in components:
        return
    args = runs[-1]
    recorded = {"--resolution": 28, "--num_train_timesteps": 1000, "--prediction_type": "epsilon"}
    recorded |= {flag: type(value)(args[args.index(flag) + 1]) for flag, value in recorded.items() if flag in args}
    unet, scheduler = components["unet"].config, components["scheduler"].config
    found = {
        "--resolution": unet.sample_size,
        "--num_train_timesteps": scheduler.num_train_timesteps,
        "--prediction_type": scheduler.prediction_type,
    }
    for flag, value in found.items():
        if value != recorded[flag]:
            raise ValueError(
                f"{folder}: the UNet was trained with {flag} {recorded[flag]} ({record}), but the folder's config "
                f"says {value}; restore the config or retrain."
            )


def load_model(cls, folder: str, name: str, dtype: torch.dtype | None = None, **options):
    """One model component from safetensors weights, refused with its file named when a tensor is missing or left
    over (diffusers would only warn, and run on uninitialised memory)."""
    subfolder = Path(folder) / name
    weights = sorted(subfolder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(subfolder.glob("*.bin"))
        reason = f"only pickled weights ({pickled[0].name}), which can run code" if pickled else "no weights"
        raise ValueError(f"{subfolder} has {reason}: diffusion_pytorch_model.safetensors is needed.")

    def load():
        return cls.from_pretrained(
            folder, subfolder=name, torch_dtype=dtype, use_safetensors=True, output_loading_info=True, **options
        )

    model, info = _load(folder, name, load)
    problems = {key: info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {key: value for key, value in problems.items() if value}
    if problems:
        listed = "; ".join(f"{key.replace('_', ' ')}: {sorted(map(str, keys))[:5]}" for key, keys in problems.items())
        raise ValueError(f"{weights[0]} does not fit the {name}'s config ({listed}).")
    return model


def _load(folder: str, name: str, load):
    """One component, with an error that names its file when it is missing or broken."""
    try:
        return load()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        files = sorted((Path(folder) / name).glob("*.safetensors")) or [Path(folder) / name / "scheduler_config.json"]
        raise ValueError(f"Cannot load the {name} from {files[0]}: {error}") from error


def _dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value.removeprefix("torch."), None), torch.dtype):
        return getattr(torch, value.removeprefix("torch."))
    raise TypeError(f"`torch_dtype` must be a torch dtype or its name such as 'float16', got {value!r}.")


def write_remote_code(pipe, folder: str | os.PathLike):
    """The modules behind `pipe`, found by walking its imports, as flat files of `folder` (and each custom
    component's module with what it imports in its sub-folder), their imports made relative, and
    `model_index.json` pointing at them."""
    folder = Path(folder)
    pipeline_module = sys.modules[type(pipe).__module__]
    for module in imported_modules(pipeline_module, check_direct=True):
        (folder / _module_file(module)).write_text(_flat_source(module), encoding="utf-8")
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    index["_class_name"] = [_module_file(pipeline_module).removesuffix(".py"), type(pipe).__name__]
    for name in pipe._optional_components:
        component = pipe.components[name]
        if component is None:
            continue
        module = sys.modules[type(component).__module__]
        for needed in imported_modules(module, check_direct=True):
            (folder / name / _module_file(needed)).write_text(_flat_source(needed), encoding="utf-8")
        index[name] = [_module_file(module).removesuffix(".py"), type(component).__name__]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def imported_modules(module, check_direct: bool = False) -> list:
    """`module` and every diffscm module it imports, directly or through the others (by their `from` lines). With
    `check_direct`, refused unless `module` imports them all itself: diffusers' remote-code loader copies only the
    direct relative imports of the module it loads."""
    found, pending = [], [module]
    while pending:
        current = pending.pop(0)
        if current not in found:
            found.append(current)
            pending += _direct_imports(current)
    indirect = [m.__name__ for m in found[1:] if m not in _direct_imports(module)]
    if check_direct and indirect:
        raise RuntimeError(f"{module.__name__} must import {indirect} itself, or plain diffusers cannot load it.")
    return found


def _direct_imports(module) -> list:
    names = _IMPORT.findall(inspect.getsource(module))
    resolved = [importlib.util.resolve_name(n, module.__package__) if n.startswith(".") else n for n in names]
    return [importlib.import_module(name) for name in resolved]


def _module_file(module) -> str:
    return module.__name__.rsplit(".", 1)[-1] + ".py"


def _flat_source(module) -> str:
    """The module's source with its diffscm imports pointing at the flat files beside it (`from .anticausal`)."""
    return _IMPORT.sub(lambda m: f"from .{m.group(1).rsplit('.', 1)[-1]} import", inspect.getsource(module))


def write_model_card(folder: str | os.PathLike, repo_id: str | None = None):
    """The project's card for a saved folder; skipped with a warning where diffscm (which renders it) is missing, as
    in a folder's shipped code run by plain diffusers."""
    try:  # by name: loading the shipped code must not need diffscm (diffusers checks the imports it sees)
        model_cards = importlib.import_module("diffscm.model_cards")
    except ImportError:
        from diffusers.utils import logging

        logging.get_logger(__name__).warning(
            f"Saved {folder} without its model card (README.md): diffscm, which renders it, is not installed."
        )
        return
    model_cards.write_model_card(folder, repo_id=repo_id)


def staged_save(save_directory: str | os.PathLike, source: str, write):
    """Save a pipeline atomically: `write(staging)` fills a sibling folder, the records of the folder it was loaded
    from are kept when it is saved back there (another pipeline's are never carried over), and the staging folder
    then takes the place of `save_directory`. A folder that holds files but no pipeline is refused, not replaced."""
    target = Path(save_directory)
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not (target / "model_index.json").is_file()):
        raise ValueError(f"{target} holds files but no pipeline: save into a new or empty folder, or a pipeline's.")
    staging, old = target.with_name(f".{target.name}.partial"), target.with_name(f".{target.name}.old")
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    write(staging)
    if source and target.is_dir() and Path(source).resolve() == target.resolve():
        for name in RECORDS:
            if (target / name).is_file():
                shutil.copy2(target / name, staging / name)
    if target.exists():
        os.rename(target, old)
    os.rename(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    write_model_card(target)  # rendered from the files in place, under the name a user loads it by
