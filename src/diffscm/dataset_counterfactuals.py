"""Counterfactuals of a whole data set, written as an imagefolder that `datasets.load_dataset("imagefolder",
data_dir=OUT)` reads: sharded over the processes of `accelerate launch`, resumable after a kill.

The data set is cut into shards of consecutive rows; process p of n takes shards p, p + n, ... Each shard is written
into `OUT/.shard-K.partial/` (its PNGs and a `metadata.jsonl` with the factual values, the intervention, the
counterfactual values and the anti-causal predictor's reading), then renamed to `OUT/shard-K/`: a finished shard is
complete, and a rerun with the same request skips it.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

REQUEST_FILE = "request.json"


def shard_ranges(num_rows: int, shard_size: int) -> list[range]:
    return [range(start, min(start + shard_size, num_rows)) for start in range(0, num_rows, shard_size)]


def check_request(out_dir: Path, request: dict):
    """Record the request in `out_dir`, or refuse to resume a folder that was made by another one."""
    path = out_dir / REQUEST_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        if recorded != request:
            raise ValueError(
                f"{out_dir} holds counterfactuals of another request ({recorded}); use another --out or the same "
                "request to resume."
            )
    else:
        path.write_text(json.dumps(request, indent=2) + "\n")


def interventions_for(pipe, rows: dict, request: dict, start: int) -> dict:
    """The intervention of each row: fixed values, or for `{"random": name}` a seeded random other class."""
    if "random" in request:
        name = request["random"]
        node = pipe.causal_graph.nodes[name]
        factual = np.asarray(rows[node.data_column])
        generator = np.random.default_rng(request.get("seed", 0) + start)
        return {name: (factual + generator.integers(1, node.num_classes, len(factual))) % node.num_classes}
    return {name: np.full(len(next(iter(rows.values()))), value) for name, value in request["intervention"].items()}


@torch.no_grad()
def write_counterfactuals(
    pipe, dataset, request: dict, out_dir: str, shard_size: int = 256, options: dict | None = None
) -> tuple[int, int]:
    """
    Counterfactuals of every row of `dataset` (columns `image` and the image parents' data columns) under `request`
    (`{"intervention": {name: value}}` or `{"random": categorical name, "seed": s}`), into `out_dir`. Returns the
    number of shards this process wrote (those it skipped as done are not counted) and its index.
    """
    state = PartialState(cpu=not torch.accelerator.is_available())  # without a GPU, gloo processes on the CPU
    out = Path(out_dir)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        check_request(out, request | {"num_rows": len(dataset), "shard_size": shard_size})
    state.wait_for_everyone()
    graph = pipe.causal_graph
    columns = {name: node.data_column for name, node in graph.nodes.items() if node.type != "image"}
    shards = list(enumerate(shard_ranges(len(dataset), shard_size)))[state.process_index :: state.num_processes]
    written = 0
    for index, rows_range in tqdm(shards, desc="shards", disable=not state.is_local_main_process):
        final = out / f"shard-{index:05d}"
        if final.is_dir():
            continue
        partial = out / f".shard-{index:05d}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        rows = dataset.select(rows_range)[:]
        factual = {name: np.asarray(rows[column]) for name, column in columns.items() if column in rows}
        intervention = interventions_for(pipe, rows, request, rows_range.start)
        result = pipe(rows["image"], intervention=intervention, factual_values=factual, **(options or {}))
        with open(partial / "metadata.jsonl", "w") as f:
            for i, image in enumerate(result.images):
                name = f"{rows_range.start + i:07d}.png"
                image.save(partial / name)
                record = {
                    "file_name": name,
                    "source_index": rows_range.start + i,
                    "factual": {k: _plain(v[i]) for k, v in result.factual_values.items()},
                    "intervention": {k: _plain(v[i]) for k, v in intervention.items()},
                    "counterfactual": {k: _plain(v[i]) for k, v in result.counterfactual_values.items()},
                    "predictor_reading": {k: _plain(v[i]) for k, v in result.predicted_values.items()},
                }
                f.write(json.dumps(record) + "\n")
        partial.rename(final)
        written += 1
    state.wait_for_everyone()
    return written, state.process_index


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value
