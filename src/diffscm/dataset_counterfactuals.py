"""Counterfactuals of a whole data set, written as an imagefolder that `datasets.load_dataset("imagefolder",
data_dir=OUT)` reads: sharded over the processes of `accelerate launch`, resumable after a kill.

The data set is cut into shards of consecutive rows; process p of n takes shards p, p + n, ... Each shard is written
into `OUT/.shard-K.partial/` (its PNGs and a `metadata.jsonl` with the factual values, the intervention, the
counterfactual values and the anti-causal predictor's reading), then renamed to `OUT/shard-K/`: a finished shard is
complete, and a rerun with the same request skips it.
"""

import contextlib
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

REQUEST_FILE = "request.json"
LOCK_FILE = ".writer.lock"


def shard_ranges(num_rows: int, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, num_rows)) for start in range(0, num_rows, shard_size)]


def check_request(out_dir: Path, request: dict):
    """Record the request in `out_dir`, or refuse to resume a folder that was made by another one, naming what
    differs (the model, its weights, a setting of the chain, the data)."""
    path = out_dir / REQUEST_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != request:
            differs = {
                key: (recorded.get(key), request.get(key))
                for key in recorded.keys() | request.keys()
                if recorded.get(key) != request.get(key)
            }
            shown = "; ".join(f"{key}: {old!r} there, {new!r} now" for key, (old, new) in sorted(differs.items()))
            raise ValueError(
                f"{out_dir} holds counterfactuals of another request ({shown}); use another --out or the same "
                "request to resume."
            )
    else:
        path.write_text(json.dumps(request, indent=2) + "\n")


def model_fingerprint(pipe) -> dict:
    """The model behind a run: its folder or Hub id and a SHA-256 of every weights and config file it loads from,
    through symlinked sub-folders too (a changed `scheduler_config.json` changes the chain as new weights would)."""
    folder = Path(str(pipe.config._name_or_path))
    files = [
        Path(root) / name
        for root, _, names in os.walk(folder, followlinks=True)
        for name in names
        if name.endswith((".safetensors", ".json")) and name != REQUEST_FILE
    ]
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.relative_to(folder).as_posix().encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return {"model": str(folder), "model_sha256": digest.hexdigest()}


@contextlib.contextmanager
def writer_lock(out_dir: Path):
    """One writer per folder: an `O_EXCL` lock file naming its process; another live writer is refused, a lock left
    by a killed one is taken over."""
    path = out_dir / LOCK_FILE
    owner = f"{socket.gethostname()}:{os.getpid()}"
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            held_by = path.read_text().strip() if path.is_file() else ""
            host, _, pid = held_by.partition(":")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)  # its writer was killed: resume
                continue
            raise RuntimeError(
                f"Another process ({held_by or 'unknown'}) is writing counterfactuals into {out_dir}; wait for it, or "
                f"use another --out (remove {path} if that process is gone)."
            ) from None
        with os.fdopen(descriptor, "w") as f:
            f.write(owner)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def interventions_for(pipe, factual: dict, request: dict, rows: range) -> dict:
    """The intervention of each of `rows`: fixed values, or for `{"random": name}` a seeded random other class than
    its `factual` one."""
    if "random" in request:
        name = request["random"]
        classes = pipe.causal_graph.nodes[name].num_classes
        generator = np.random.default_rng(request.get("seed", 0) + rows.start)
        return {name: (factual[name] + generator.integers(1, classes, len(rows))) % classes}
    return {name: np.full(len(rows), value) for name, value in request["intervention"].items()}


@torch.no_grad()
def write_counterfactuals(
    pipe, dataset, request: dict, out_dir: str, shard_size: int = 256, options: dict | None = None
) -> tuple[int, int]:
    """
    Counterfactuals of every row of `dataset` (columns `image` and the image parents' data columns) under `request`
    (`{"intervention": {name: value}}`, `{"random": categorical name, "seed": s}`, or `{"all": categorical name}`:
    every class of it, one counterfactual each from one abduction per image), into `out_dir`. Returns the number of
    shards this process wrote (those it skipped as done are not counted) and its index.
    """
    factual = data_values(pipe.causal_graph, dataset)  # a value the graph cannot read: refused before any writing
    if "random" in request and request["random"] not in factual:
        node = pipe.causal_graph.nodes[request["random"]]
        raise ValueError(f"A random other {node.name} per row needs the data's column {node.data_column!r}.")
    state = PartialState(cpu=not torch.accelerator.is_available())  # without a GPU, gloo processes on the CPU
    out = Path(out_dir)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    with writer_lock(out) if state.is_main_process else contextlib.nullcontext():
        if state.is_main_process:
            settings = {"options": {k: _plain(v) for k, v in (options or {}).items()}, "dtype": str(pipe.unet.dtype)}
            check_request(
                out,
                request | {"num_rows": len(dataset), "shard_size": shard_size} | settings | model_fingerprint(pipe),
            )
        state.wait_for_everyone()
        written = _write_shards(pipe, dataset, factual, request, out, shard_size, options, state)
    return written, state.process_index


def data_values(graph, dataset) -> dict[str, np.ndarray]:
    """The values of every variable whose column the data set has, read once, class names encoded."""
    return {
        name: node.encode(dataset[node.data_column])
        for name, node in graph.nodes.items()
        if node.type != "image" and node.data_column in dataset.column_names
    }


def _write_shards(
    pipe, dataset, values: dict, request: dict, out: Path, shard_size: int, options: dict | None, state
) -> int:
    """This process's shards, each written into a `.partial` folder and renamed when complete."""
    graph = pipe.causal_graph
    shards = list(enumerate(shard_ranges(len(dataset), shard_size)))[state.process_index :: state.num_processes]
    written = 0
    for index, rows_range in tqdm(shards, desc="shards", disable=not state.is_local_main_process):
        final = out / f"shard-{index:05d}"
        if final.is_dir():
            continue
        partial = out / f".shard-{index:05d}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        factual = {name: column[rows_range.start : rows_range.stop] for name, column in values.items()}
        images = list(dataset.select(rows_range)["image"])
        if "all" in request:  # one abduction per image, shared by every class: the pipeline's own target="all"
            result = pipe(images, target="all", factual_values=factual, **(options or {}))
            intervention = {request["all"]: result.counterfactual_values[request["all"]]}
        else:
            intervention = interventions_for(pipe, factual, request, rows_range)
            result = pipe(images, intervention=intervention, factual_values=factual, **(options or {}))
        per_row = len(result.images) // len(images)
        with open(partial / "metadata.jsonl", "w") as f:
            for i, image in enumerate(result.images):
                row = rows_range.start + i // per_row
                name = f"{row:07d}.png" if per_row == 1 else f"{row:07d}-{i % per_row:03d}.png"
                image.save(partial / name)
                record = {
                    "file_name": name,
                    "source_index": row,
                    "factual": {k: _named(graph, k, v[i // per_row]) for k, v in result.factual_values.items()},
                    "intervention": {k: _named(graph, k, v[i]) for k, v in intervention.items()},
                    "counterfactual": {k: _named(graph, k, v[i]) for k, v in result.counterfactual_values.items()},
                    "predictor_reading": {k: _named(graph, k, v[i]) for k, v in result.predicted_values.items()},
                }
                f.write(json.dumps(record) + "\n")
        partial.rename(final)
        written += 1
    state.wait_for_everyone()
    return written


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _named(graph, name: str, value):
    """A value as the metadata writes it: a categorical node's class name where it has names, else the number."""
    node = graph.nodes.get(name)
    if node is not None and node.type == "categorical" and node.classes is not None:
        return node.value_name(value)
    return _plain(value)
