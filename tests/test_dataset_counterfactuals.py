"""Counterfactuals of a whole data set: an imagefolder with metadata, shared over 2 CPU processes, resumable."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import datasets
import numpy as np
import pytest
from conftest import tiny_pipeline

from diffscm.cli import main
from diffscm.data import load_bundled_mnist
from diffscm.dataset_counterfactuals import LOCK_FILE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("datasets") / "pipeline"
    tiny_pipeline(size=28, num_classes=10, num_inference_steps=2, guidance_scale=1.0).save_pretrained(folder)
    return folder


def command(model_dir, out, *extra) -> list[str]:
    return ["counterfactual", "--dataset", "mnist-bundled", "--num-images", "12", "--shard-size", "2", "--target",
            "random", "--model", str(model_dir), "--out", str(out), "--quiet", *extra]  # fmt: skip


def launch(argv: list[str], processes: int) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    launcher += ["--multi_gpu"] if processes > 1 else ["--num_machines", "1", "--mixed_precision", "no"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*launcher, "-m", "diffscm.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def load(out) -> datasets.Dataset:
    return datasets.load_dataset("imagefolder", data_dir=str(out), split="train").sort("source_index")


def test_a_data_set_becomes_an_imagefolder_with_its_values(model_dir, tmp_path):
    main(command(model_dir, tmp_path / "cf"))
    ds = load(tmp_path / "cf")
    assert ds["source_index"] == list(range(12))
    labels = load_bundled_mnist().select(range(12))["label"]
    assert [row["factual"]["label"] for row in ds] == labels, "the data's own labels are the factual values"
    assert all(row["intervention"]["label"] != row["factual"]["label"] for row in ds), "another class each"
    assert all(row["counterfactual"] == row["intervention"] for row in ds)
    assert ds[0]["image"].size == (28, 28) and set(ds[0]["predictor_reading"]) == {"label"}


def test_class_folders_the_graph_cannot_name_are_refused_before_anything_is_written(model_dir, tmp_path):
    import PIL.Image

    for name in ("three", "seven"):
        (tmp_path / "digits" / name).mkdir(parents=True)
        PIL.Image.new("L", (28, 28)).save(tmp_path / "digits" / name / "0.png")
    argv = ["counterfactual", "--data-dir", str(tmp_path / "digits"), "--target", "3", "--model", str(model_dir),
            "--out", str(tmp_path / "cf"), "--quiet"]  # fmt: skip
    with pytest.raises(SystemExit, match="got the class name 'seven'.*\"classes\""):
        main(argv)
    assert not list((tmp_path / "cf").iterdir()), "no request.json or shard left behind"


@pytest.mark.slow
def test_two_processes_share_the_work_and_a_killed_run_resumes(model_dir, tmp_path):
    reference = tmp_path / "reference"
    main(command(model_dir, reference))
    out = tmp_path / "shared"
    process = launch(command(model_dir, out), processes=2)
    deadline = time.time() + 300
    while len(list(out.glob("shard-*"))) < random.choice([1, 2, 3]) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = launch(command(model_dir, out), processes=2)
    output, _ = result.communicate(timeout=600)
    assert result.returncode == 0, output[-3000:]
    assert "Process 0 wrote" in output and "Process 1 wrote" in output, "two processes shared the work"
    assert not list(out.glob(".shard-*")), "no half-written shard is left"
    shared, alone = load(out), load(reference)
    assert shared["source_index"] == list(range(12)), "each row once: none lost, none twice"
    for a, b in zip(shared, alone, strict=True):
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        assert a["intervention"] == b["intervention"] and a["counterfactual"] == b["counterfactual"]
    assert json.loads((out / "request.json").read_text())["random"] == "label"


def test_a_resume_with_another_request_is_refused(model_dir, tmp_path):
    main(command(model_dir, tmp_path / "cf"))
    with pytest.raises(SystemExit, match="another request .*seed: 0 there, 1 now"):
        main(command(model_dir, tmp_path / "cf", "--seed", "1"))
    with pytest.raises(SystemExit, match="options: .*'num_inference_steps': None.* there, .*'num_inference_steps': 4"):
        main(command(model_dir, tmp_path / "cf", "--steps", "4"))
    other = tmp_path / "other-model"
    shutil.copytree(model_dir, other)
    with pytest.raises(SystemExit, match="model: .* there"):
        main(command(other, tmp_path / "cf"))
    recorded = json.loads((tmp_path / "cf" / "request.json").read_text())
    assert len(recorded["model_sha256"]) == 64 and recorded["model"] == str(model_dir)


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(model_dir, tmp_path):
    out = tmp_path / "cf"
    out.mkdir()
    (out / LOCK_FILE).write_text(f"{socket.gethostname()}:{os.getppid()}")  # a live process: pytest's parent
    with pytest.raises(SystemExit, match="Another process .* is writing counterfactuals into"):
        main(command(model_dir, out))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_FILE).write_text(f"{socket.gethostname()}:{dead.pid}")
    main(command(model_dir, out))
    assert len(load(out)) == 12 and not (out / LOCK_FILE).exists()


def test_a_random_other_class_needs_the_column_it_is_drawn_from(model_dir, tmp_path):
    from diffscm import DiffSCMPipeline
    from diffscm.dataset_counterfactuals import write_counterfactuals

    images = datasets.Dataset.from_dict({"image": load_bundled_mnist().select(range(2))["image"]})
    with pytest.raises(ValueError, match="random other label per row needs the data's column 'label'"):
        write_counterfactuals(DiffSCMPipeline.from_pretrained(model_dir), images, {"random": "label"}, tmp_path / "o")
    assert not (tmp_path / "o").exists(), "refused before anything was written"


def test_every_class_of_each_row_comes_from_one_abduction_of_its_image(model_dir, tmp_path):
    from diffscm import DiffSCMPipeline
    from diffscm.dataset_counterfactuals import write_counterfactuals
    from diffscm.evaluation.metrics import count_calls

    pipe = DiffSCMPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    rows = load_bundled_mnist().select(range(3))
    with count_calls(pipe.unet) as calls:
        write_counterfactuals(pipe, rows, {"all": "label"}, tmp_path / "all", shard_size=2)
    ds = load(tmp_path / "all")
    assert ds["source_index"] == [i for i in range(3) for _ in range(10)]
    assert [row["intervention"]["label"] for row in ds] == list(range(10)) * 3
    assert all(row["factual"]["label"] == rows[row["source_index"]]["label"] for row in ds)
    steps = pipe.config.num_inference_steps
    assert calls["samples"] == 3 * steps + 30 * steps, "one abduction per image (no refinement), one chain per class"
    main(command(model_dir, tmp_path / "cli", "--target", "all", "--num-images", "2"))
    assert len(load(tmp_path / "cli")) == 20
