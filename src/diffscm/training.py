"""What both training scripts share: arguments, data, Accelerator set-up, crash-safe checkpoints and resume."""

import argparse
import copy
import importlib.util
import json
import logging
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from accelerate.utils import load as load_allow_listed
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import BUNDLED_MNIST, images_to_tensor, load_image_dataset, split_dataset
from .image_processing import random_affine
from .scm import CausalGraph

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
EMA_FILE = "ema.safetensors"


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments common to `train_unet.py` and `train_classifier.py` (names follow diffusers' examples)."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=None, help=f"Built-in data set: {BUNDLED_MNIST!r} (the default).")
    data.add_argument("--dataset_name", default=None, help="A Hugging Face Hub data set id, e.g. ylecun/mnist.")
    data.add_argument("--train_data_dir", default=None, help="An imagefolder tree or a Morpho-MNIST folder.")
    data.add_argument(
        "--extra_train_data_dir",
        nargs="+",
        default=[],
        help="More folders (e.g. from redraw_morphomnist.py) added to the training split only; never held out.",
    )
    data.add_argument(
        "--split",
        default=None,
        help="The split to train on: a Hub data set's (default train), or the official "
        "Morpho-MNIST release's train / test when --train_data_dir holds both.",
    )
    data.add_argument("--image_column", default="image")
    data.add_argument("--label_column", default="label")
    data.add_argument("--cache_dir", default=None)
    data.add_argument("--resolution", type=int, default=28, help="Smaller images are zero-padded, larger resized.")
    data.add_argument("--num_channels", type=int, default=1, choices=(1, 3))
    data.add_argument(
        "--holdout_size",
        type=float,
        default=None,
        help="Held-out images: a count, a fraction < 1, or 0 for none (default: 10%% of the data, at most 500).",
    )
    data.add_argument("--split_seed", type=int, default=0, help="Seed of the recorded train/held-out split.")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", required=True)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, default=64)
    train.add_argument("--max_train_steps", type=int, default=None, help="Default: --num_epochs' steps, or 1000.")
    train.add_argument("--num_epochs", type=int, default=None, help="Passes over the data; --max_train_steps wins.")
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--learning_rate", type=float, default=1e-3)
    train.add_argument("--lr_scheduler", default="cosine")
    train.add_argument("--lr_warmup_steps", type=int, default=100)
    train.add_argument("--adam_weight_decay", type=float, default=0.0)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--use_ema", action="store_true", help="Keep EMA weights and export them.")
    train.add_argument("--ema_max_decay", type=float, default=0.999)
    train.add_argument("--mixed_precision", default=None, choices=("no", "fp16", "bf16"))
    train.add_argument("--checkpointing_steps", type=int, default=500)
    train.add_argument("--checkpoints_total_limit", type=int, default=None)
    train.add_argument("--resume_from_checkpoint", default=None, help='A checkpoint folder or "latest".')
    train.add_argument(
        "--report_to",
        default="tensorboard" if importlib.util.find_spec("tensorboard") else None,
        help='Where to log: a tracker (tensorboard, wandb, ...), or "none" for no logging (default: tensorboard '
        "where installed, else none).",
    )
    train.add_argument("--logging_dir", default="logs", help="Tracker logs, under --output_dir.")
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up: 1 - (1 + step / gamma)^-power.")
    train.add_argument("--ema_power", type=float, default=None, help="EMA warm-up power (default: no warm-up).")
    hub_args = parser.add_argument_group("hub")
    hub_args.add_argument("--push_to_hub", action="store_true", help="Upload the exported model when done.")
    hub_args.add_argument("--hub_model_id", default=None, help="The Hub repo, e.g. your-name/diffscm-mnist.")
    hub_args.add_argument("--hub_token", default=None)
    hub_args.add_argument("--hub_private_repo", action="store_true")
    return parser


def parse_judge_args(parser: argparse.ArgumentParser, argv, kind: str) -> argparse.Namespace:
    """A judge's (oracle, VAE) arguments: the training ones, checked, and --export_dir (default: OUTPUT/{kind})."""
    parser.add_argument("--export_dir", default=None, help=f"Where the {kind} goes (default: OUTPUT/{kind}).")
    args = parser.parse_args(argv)
    check_training_args(args)
    args.export_dir = args.export_dir or os.path.join(args.output_dir, kind)
    return args


def check_training_args(args: argparse.Namespace):
    """Fail fast, before any model is built, on arguments that cannot work."""
    for folder in filter(None, [args.train_data_dir, *args.extra_train_data_dir]):
        if not os.path.isdir(folder):
            raise ValueError(f"the data folder {folder!r} does not exist.")
    if args.dataset not in (None, BUNDLED_MNIST):
        raise ValueError(
            f"unknown --dataset {args.dataset!r}; use {BUNDLED_MNIST!r}, --dataset_name or --train_data_dir."
        )
    positive = [
        "train_batch_size",
        "max_train_steps",
        "num_epochs",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "resolution",
    ]
    positive += [
        name
        for name in ("save_images_steps", "eval_batch_size", "checkpoints_total_limit", "num_classes")
        if name in vars(args)
    ]
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (a Hub repo such as your-name/diffscm-mnist).")
    if os.path.isfile(args.output_dir):
        raise ValueError(f"--output_dir {args.output_dir!r} is a file, not a folder.")


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    project = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
    )
    accelerator = Accelerator(
        # Without a GPU, `accelerate launch --multi_gpu --num_processes N` must still start N gloo processes.
        cpu=not torch.accelerator.is_available(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to in (None, "none") else args.report_to,
        project_config=project,
        # Seeded shuffling, so that a resumed run skips the batches of the very order it was interrupted in.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    set_seed(args.seed)
    logger.info(
        f"{accelerator.num_processes} process(es), {accelerator.distributed_type}, device {accelerator.device}"
    )
    warn_if_emulated_bf16(args.mixed_precision, accelerator.device)
    return accelerator


def warn_if_emulated_bf16(mixed_precision: str | None, device: torch.device):
    """bf16 autocast on a CPU without native bfloat16 (oneDNN's AVX-512 BF16 or AMX kernels) is emulated: on an
    AVX2-only EPYC a batch-64 step of the 1.2M UNet took 36 s, against 3.7 s in fp32."""
    if mixed_precision == "bf16" and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        logger.warning(
            f"This CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bfloat16: bf16 autocast runs "
            "emulated, about 10x slower than fp32 here. Pass --mixed_precision no."
        )


def load_split(args: argparse.Namespace):
    """The train / held-out `DatasetDict` and its record (source, seed, held-out source indices)."""
    ds = load_image_dataset(
        args.dataset,
        args.dataset_name,
        args.train_data_dir,
        args.image_column,
        args.label_column,
        args.cache_dir,
        args.split,
    )
    holdout = int(args.holdout_size) if args.holdout_size is not None and args.holdout_size >= 1 else args.holdout_size
    split = split_dataset(ds, holdout, seed=args.split_seed)
    source = args.dataset_name or args.train_data_dir or args.dataset or BUNDLED_MNIST
    record = {
        "source": source,
        "num_images": len(ds),
        "num_train": len(split["train"]),
        "num_heldout": len(split["heldout"]),
        "split_seed": args.split_seed,
        "heldout_indices": sorted(split["heldout"]["source_index"]),
    }
    if args.extra_train_data_dir:
        extra = [load_image_dataset(train_data_dir=folder) for folder in args.extra_train_data_dir]
        columns = split["train"].column_names
        extra = [ds.add_column("source_index", [-1] * len(ds)).select_columns(columns) for ds in extra]
        split["train"] = datasets.concatenate_datasets([split["train"], *extra])
        record |= {"extra_train_sources": args.extra_train_data_dir, "num_train": len(split["train"])}
    return split, record


def num_labels(dataset) -> int:
    """Classes of the `label` column: its ClassLabel size, else the largest label + 1 (not only those present)."""
    feature = dataset.features["label"]
    return feature.num_classes if hasattr(feature, "num_classes") else max(dataset["label"]) + 1


class TensorBatches(torch.utils.data.Dataset):
    """A data set decoded once into tensors held in memory: a batch is one indexing per column, so the training step
    never waits on PIL (`DataLoader` fetches whole batches through `__getitems__`)."""

    def __init__(self, columns: dict[str, torch.Tensor]):
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices)
        return {name: column[index] for name, column in self.columns.items()}


def _whole_batch(batch: dict) -> dict:
    """`TensorBatches.__getitems__` already returns the collated batch."""
    return batch


def make_dataloader(
    dataset, args: argparse.Namespace, shuffle: bool = True, values: dict[str, np.ndarray] | None = None
) -> DataLoader:
    """Batches of `pixel_values` in [-1, 1] (and `labels`, where the data has integer labels), decoded once into
    memory; with `values` ({variable: one value per image}, e.g. from `node_values`) also each variable's values
    under `value/{variable}` (see `batch_values`)."""
    columns = {"pixel_values": images_to_tensor(dataset["image"], args.num_channels, args.resolution)}
    if "label" in dataset.column_names and np.asarray(dataset["label"]).dtype.kind in "iu":
        columns["labels"] = torch.as_tensor(dataset["label"])
    columns |= {f"value/{name}": torch.as_tensor(value) for name, value in (values or {}).items()}
    return DataLoader(
        TensorBatches(columns),
        batch_size=args.train_batch_size,
        shuffle=shuffle,
        num_workers=args.dataloader_num_workers,
        collate_fn=_whole_batch,
        drop_last=shuffle and len(dataset) >= args.train_batch_size,
        # Its own generator: starting an epoch (or a resumed run's first batches) then draws no number from the
        # global RNG, whose restored state a resumed run's noise must continue from.
        generator=torch.Generator().manual_seed(args.seed),
    )


def node_values(graph: CausalGraph, dataset) -> dict[str, np.ndarray]:
    """Every non-image node's values in a data set, read from its column, class names encoded."""
    needed = set(graph.node_columns.values())
    return graph.encode({column: dataset[column] if column in needed else None for column in dataset.column_names})


def parent_values(graph: CausalGraph, dataset) -> dict[str, np.ndarray]:
    """The image's parents' values in a data set (what the noise model and the predictors are conditioned on)."""
    values = node_values(graph, dataset)
    return {name: values[name] for name in graph.image_parents}


def load_graph(args: argparse.Namespace, split) -> tuple[CausalGraph | None, dict]:
    """--causal_graph with what its file left out (ranges, mechanisms) fitted on the training split; the report
    holds each fitted mechanism's held-out fit."""
    if not args.causal_graph:
        return None, {}
    graph = CausalGraph.load(args.causal_graph)
    return graph.fit(node_values(graph, split["train"]), node_values(graph, split["heldout"]))


def noise_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What a UNet of `scheduler`'s prediction type learns to output: the noise, or the velocity v."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    return noise


def batch_values(batch: dict) -> dict[str, torch.Tensor]:
    """The variables' values of a batch from `make_dataloader(..., values=...)`, keyed by variable."""
    return {key.removeprefix("value/"): value for key, value in batch.items() if key.startswith("value/")}


def augmented_images(batch: dict, degrees: float) -> torch.Tensor:
    """A batch's images, each randomly rotated by up to `degrees`, scaled and shifted (none for 0): the judges'
    augmentation (`--augment_degrees`)."""
    images = batch["pixel_values"]
    return random_affine(images, degrees=degrees) if degrees > 0 else images


def start_run(accelerator: Accelerator, args: argparse.Namespace, name: str, split_record: dict):
    """On the main process: record the split in `split.json` and start the trackers (tensorboard when installed)."""
    if accelerator.is_main_process:
        write_json(Path(args.output_dir) / "split.json", split_record)
        accelerator.init_trackers(name, config={k: str(v) for k, v in vars(args).items()})


def batches_from(accelerator: Accelerator, dataloader: DataLoader, start_step: int, accumulation: int):
    """Endless stream of batches that continues a resumed run where its checkpoint left the data."""
    epoch, skip = divmod(start_step * accumulation, len(dataloader))
    while True:
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        yield from accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        epoch, skip = epoch + 1, 0


def save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, step: int, ema: EMAModel | None = None):
    """Write `checkpoint-{step}` atomically: every process saves its part (its RNG state included) into a temporary
    folder, the EMA weights go to `ema.safetensors`, then the main process renames the folder and prunes the oldest
    beyond --checkpoints_total_limit."""
    final = Path(args.output_dir) / f"checkpoint-{step}"
    partial = Path(args.output_dir) / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(partial))
    except (OSError, RuntimeError) as error:  # torch reports a full disk as "unexpected pos ..."
        free = shutil.disk_usage(args.output_dir).free / 2**20
        raise RuntimeError(
            f"Could not write {partial} ({error}); {free:.0f} MiB are free on its disk. Free space (or lower "
            "--checkpoints_total_limit), then resume with --resume_from_checkpoint latest."
        ) from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            tensors = {f"shadow.{i}": param.contiguous() for i, param in enumerate(ema.shadow_params)}
            save_file(tensors, partial / EMA_FILE, metadata={"optimization_step": str(ema.optimization_step)})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if args.checkpoints_total_limit is not None:
            for old in list_checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
        logger.info(f"Saved {final}")
    accelerator.wait_for_everyone()


def list_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones (still `.partial`) never match."""
    folder = Path(output_dir)
    found = [p for p in folder.iterdir() if CHECKPOINT_PATTERN.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def maybe_resume(accelerator: Accelerator, args: argparse.Namespace, ema: EMAModel | None = None) -> int:
    """Restore models, optimizer, LR schedule, EMA and RNG from a checkpoint; returns the step to continue from.
    With `latest`, a checkpoint that cannot be read (truncated, emptied) is named and the one before it is used."""
    if not args.resume_from_checkpoint:
        return 0
    check_resumed_flags(args)
    if args.resume_from_checkpoint == "latest":
        candidates = list_checkpoints(args.output_dir)[::-1]
        if not candidates:
            logger.info("No checkpoint to resume from; starting a new run.")
            return 0
    else:
        path = Path(args.resume_from_checkpoint)
        if not CHECKPOINT_PATTERN.match(path.name) or not path.is_dir():
            raise ValueError(f"{path} is not a checkpoint-N folder.")
        candidates = [path]
    problems = []
    for path in candidates:
        try:
            load_checkpoint(accelerator, path, ema)
        except Exception as error:  # torch, safetensors and accelerate raise many kinds for one broken file
            reason = unreadable(error)
            problems.append(f"{path}: {reason}")
            logger.warning(f"Cannot resume from {path} ({reason}); trying the checkpoint before it.")
            continue
        step = int(CHECKPOINT_PATTERN.match(path.name).group(1))
        logger.info(f"Resumed from {path} at step {step}")
        return step
    raise RuntimeError("No checkpoint could be read:\n" + "\n".join(problems))


# Flags a resumed run may change: how long it runs, how often it saves and reports, where its folders are.
RESUMABLE_FLAGS = {
    "max_train_steps",
    "num_epochs",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "resume_from_checkpoint",
    "save_images_steps",
    "eval_batch_size",
    "report_to",
    "logging_dir",
    "dataloader_num_workers",
    "mixed_precision",
    "cache_dir",
    "push_to_hub",
    "hub_model_id",
    "hub_token",
    "hub_private_repo",
    "pipeline_output_dir",
    "export_dir",
    "guidance_scale",
    "cfg_scale",
    "num_inference_steps",
    "abduction_refinement_steps",
    "output_dir",
    "unet_model_name_or_path",
}


def check_resumed_flags(args: argparse.Namespace):
    """A resumed run must train the model, objective, data and optimiser that its checkpoints were made with: a
    changed --prediction_type would switch objective mid-run and a changed --learning_rate would be overridden by
    the restored optimiser, so both (and every other flag outside RESUMABLE_FLAGS) are refused, by name."""
    record = Path(args.output_dir) / "training_args.json"
    if not record.is_file() or not list_checkpoints(args.output_dir):
        return
    before = read_json(record)["args"]
    now = json.loads(json.dumps(vars(args), default=str))
    changed = sorted(k for k in before.keys() & now.keys() if k not in RESUMABLE_FLAGS and before[k] != now[k])
    if changed:
        shown = ", ".join(f"--{k} {before[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"{args.output_dir} was trained with other flags ({shown}): resume with the same ones, or start a new run "
            "in another --output_dir (with --pretrained_model_name_or_path to start from its weights)."
        )


def unreadable(error: Exception) -> str:
    """Why a checkpoint file could not be read, without torch's advice to retry with weights_only=False (which would
    run whatever a hostile pickle holds)."""
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
        return (
            "it holds objects outside torch's weights-only allow-list, which diffscm never unpickles: delete this "
            "checkpoint unless you wrote it"
        )
    return str(error)


def load_checkpoint(accelerator: Accelerator, path: Path, ema: EMAModel | None):
    """accelerate's state (weights, optimizer, schedule, RNG) and the EMA weights of one checkpoint folder."""
    if ema is not None and not (path / EMA_FILE).is_file():
        raise FileNotFoundError(f"{path / EMA_FILE} is missing")
    # accelerate only logs a random-state file it cannot read, and the run would go on with other noise. The file is
    # a pickle: it is read as accelerate reads it, with torch's allow-list (weights_only=True plus numpy's RNG state
    # types), so a hostile one is refused before anything in it runs.
    random_states = path / f"random_states_{accelerator.process_index}.pkl"
    try:
        load_allow_listed(random_states)
    except Exception as error:  # a missing, truncated, foreign or hostile file raises many kinds
        raise ValueError(f"{random_states} cannot be read ({unreadable(error)})") from error
    unexpected = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
    if unexpected:  # accelerate unpickles registered objects' files with weights_only=False; we register none
        raise ValueError(f"{path} holds {unexpected}, which no diffscm run writes; refusing to unpickle them")
    accelerator.load_state(str(path))
    if ema is not None:
        with safe_open(str(path / EMA_FILE), framework="pt") as f:
            shadow = [f.get_tensor(f"shadow.{i}") for i in range(len(ema.shadow_params))]
            ema.optimization_step = int(f.metadata()["optimization_step"])
        for param, saved in zip(ema.shadow_params, shadow, strict=True):
            param.data.copy_(saved.to(param.device))


def prepare_model(accelerator: Accelerator, model: torch.nn.Module, dataloader: DataLoader, args: argparse.Namespace):
    """AdamW, the LR schedule and (with --use_ema) an EMA of the weights, prepared and registered for checkpoints;
    --max_train_steps set from --num_epochs when not given."""
    ema = None
    if args.use_ema:
        warmup = {"use_ema_warmup": True, "power": args.ema_power} if args.ema_power is not None else {}
        ema = EMAModel(model.parameters(), decay=args.ema_max_decay, inv_gamma=args.ema_inv_gamma, **warmup)
    if args.max_train_steps is None:
        per_epoch = math.ceil(len(dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
        args.max_train_steps = per_epoch * args.num_epochs if args.num_epochs else 1000
    optimizer, lr_scheduler = optimizer_and_schedule(model, args, accelerator.num_processes)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)  # checkpointed as ema.safetensors by save_checkpoint, never pickled
    return model, optimizer, dataloader, lr_scheduler, ema


def train(
    accelerator: Accelerator,
    args: argparse.Namespace,
    model: torch.nn.Module,
    optimizer,
    lr_scheduler,
    dataloader: DataLoader,
    compute_loss: Callable[[torch.nn.Module, dict], torch.Tensor | tuple[torch.Tensor, dict]],
    ema: EMAModel | None = None,
    after_step: Callable[[int], None] | None = None,
    script: str | None = None,
    images_before: int = 0,
) -> tuple[int, float]:
    """The training loop every script shares: resume, accumulate, clip, EMA, log, checkpoint (and with `script`,
    the run's record at each checkpoint: `record_run`, counting `images_before` seen by the weights it started from).

    `compute_loss` returns the loss, or the loss and more values to log.

    Returns the number of steps this run made and the seconds they took."""
    first_step = maybe_resume(accelerator, args, ema)
    batches = batches_from(accelerator, dataloader, first_step, args.gradient_accumulation_steps)
    progress = tqdm(range(first_step, args.max_train_steps), disable=not accelerator.is_local_main_process)
    started = time.perf_counter()
    stop = StopRequest(accelerator)
    for step in progress:
        for _ in range(args.gradient_accumulation_steps):
            with accelerator.accumulate(model):
                loss, extra = _with_logs(compute_loss(model, next(batches)))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"The loss became {loss.item()} at step {step}; lower --learning_rate.")
        if ema is not None:
            ema.step(model.parameters())
        done = step + 1
        logs = {"loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0], **extra}
        progress.set_postfix(**logs)
        accelerator.log(logs, step=done)
        stopping = stop.requested()
        if done % args.checkpointing_steps == 0 or done == args.max_train_steps or stopping:
            save_checkpoint(accelerator, args, done, ema)
            if script is not None and accelerator.is_main_process:
                elapsed = time.perf_counter() - started
                record_run(args, script, done - first_step, elapsed, done, accelerator.num_processes, images_before)
        if stopping:
            logger.info(f"Stopped by SIGTERM after step {done}: --resume_from_checkpoint latest goes on from there.")
            sys.exit(128 + signal.SIGTERM)
        if after_step is not None:
            after_step(done)
    stop.restore()
    accelerator.wait_for_everyone()
    return max(0, args.max_train_steps - first_step), time.perf_counter() - started


def _with_logs(returned) -> tuple[torch.Tensor, dict]:
    return returned if isinstance(returned, tuple) else (returned, {})


class StopRequest:
    """SIGTERM asks the training loop to finish its step, write a checkpoint there and exit (a job scheduler's
    pre-emption, or `kill` of a background run), instead of losing the steps since the last checkpoint. Every
    process stops at the same step: the request is shared among processes once a step."""

    def __init__(self, accelerator: Accelerator):
        self.accelerator, self.signalled = accelerator, False
        self.previous = signal.signal(signal.SIGTERM, self._signal)

    def _signal(self, signum, frame):
        self.signalled = True

    def requested(self) -> bool:
        if self.accelerator.num_processes == 1:
            return self.signalled
        flags = self.accelerator.gather(torch.tensor([int(self.signalled)], device=self.accelerator.device))
        return bool(flags.any())

    def restore(self):
        signal.signal(signal.SIGTERM, self.previous)


def trained_model(accelerator: Accelerator, model: torch.nn.Module, ema: EMAModel | None) -> torch.nn.Module:
    """A standalone float32 copy of the trained model in eval mode, with the EMA weights when there are some."""
    model = copy.deepcopy(accelerator.unwrap_model(model)).float()
    if ema is not None:
        ema.copy_to(model.parameters())
    return model.eval()


def optimizer_and_schedule(model: torch.nn.Module, args: argparse.Namespace, num_processes: int = 1):
    """AdamW and the LR schedule; accelerate steps a prepared schedule once per process at each optimizer step."""
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.adam_weight_decay,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
    )
    return optimizer, lr_scheduler


def training_command(script: str) -> str:
    """The command line that reproduces this run, as recorded in model cards."""
    return f"accelerate launch training_scripts/{script} " + shlex.join(sys.argv[1:])


def record_run(
    args: argparse.Namespace,
    script: str,
    steps_run: int,
    seconds: float,
    step: int | None = None,
    num_processes=1,
    images_before: int = 0,
) -> float | None:
    """`training_args.json`: the reproducing command, the arguments, the measured seconds per step and the images
    seen up to `step` (default --max_train_steps), `images_before` of them by the weights it fine-tuned: written at
    every checkpoint too, so that a run stopped early keeps its record.

    A rerun that only exports (nothing left to train) keeps the speed measured by the run that trained."""
    path = Path(args.output_dir) / "training_args.json"
    if steps_run:
        seconds_per_step = seconds / steps_run
    elif path.is_file():
        seconds_per_step = read_json(path)["seconds_per_step"]
    else:
        seconds_per_step = None
    step = args.max_train_steps if step is None else step
    images_seen = images_before + step * args.train_batch_size * args.gradient_accumulation_steps * num_processes
    record = {
        "command": training_command(script),
        "seconds_per_step": seconds_per_step,
        "steps": step,
        "images_seen": images_seen,
        "pretrained_images_seen": images_before,
        "args": vars(args),
    }
    write_json(path, record)
    return seconds_per_step


def images_seen_by(folder: str | None) -> int:
    """The training images behind a pretrained UNet: a pipeline folder's `training.json` or a run's
    `training_args.json` (0 for new weights or where nothing is recorded)."""
    for name, key in (("training.json", "unet_images_seen"), ("training_args.json", "images_seen")):
        if folder and (Path(folder) / name).is_file():
            return read_json(Path(folder) / name).get(key) or 0
    return 0


def export_judge(
    accelerator: Accelerator,
    args: argparse.Namespace,
    model,
    ema,
    split,
    split_record: dict,
    script: str,
    run: tuple[int, float],
    metric: str,
    measure: Callable,
    write_card: Callable,
    description: str,
):
    """On the main process: save a trained judge (oracle, VAE, image classifier) to --export_dir with `{kind}.json`
    (its held-out `metric`, `measure(model, held-out batches)`, the command and the split), write its card with
    `write_card(export_dir)`, and print the metric after `description`; then end the run."""
    if accelerator.is_main_process:
        final = trained_model(accelerator, model, ema)
        value = measure(final, make_dataloader(split["heldout"], args, shuffle=False))
        record_run(args, script, *run)
        final.save_pretrained(args.export_dir)
        command = read_json(Path(args.output_dir) / "training_args.json")["command"]
        kind = script.removeprefix("train_").removesuffix(".py")
        write_json(Path(args.export_dir) / f"{kind}.json", {metric: value, "split": split_record, "command": command})
        write_card(args.export_dir)
        print(f"{description}: {value:.4f} ({split_record['num_heldout']} held-out images)")
    accelerator.end_training()


@torch.no_grad()
def accuracy(logits_of: Callable[[torch.Tensor], torch.Tensor], dataloader: DataLoader, device) -> float:
    """The share of a data loader's labels that `logits_of(pixel_values)` ranks first."""
    correct = total = 0
    for batch in dataloader:
        predicted = logits_of(batch["pixel_values"].to(device)).argmax(-1).cpu()
        correct += (predicted == batch["labels"]).sum().item()
        total += len(predicted)
    return correct / total


def run_script(main: Callable[[argparse.Namespace], None], parse_args: Callable[[], argparse.Namespace]):
    """A training script's entry point: what the library refuses becomes an `error:` line and exit status 1, not a
    traceback."""
    try:
        main(parse_args())
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        sys.exit(f"error: {error}")


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: str | Path, data: dict):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
