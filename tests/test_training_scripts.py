"""The training scripts end to end through `accelerate launch`: tiny models, a few steps, offline."""

import argparse
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import ROOT, launch

from diffscm import DiffSCMPipeline
from diffscm.cli import main
from diffscm.data import load_image_dataset, load_morphomnist, split_dataset
from diffscm.evaluation import DigitOracle

pytestmark = pytest.mark.slow  # every test here starts a training script
CHECKPOINTS = ROOT / "checkpoints"
TINY_UNET = ["--resolution", "16", "--block_out_channels", "8", "16", "--train_batch_size", "16"]
TINY_CLASSIFIER = TINY_UNET
SAFETENSORS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "unet"
    launch(
        "train_unet.py", "--output_dir", str(out), "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--save_images_steps", "4", "--use_ema", *TINY_UNET,
    )  # fmt: skip
    return out


def test_unet_run_writes_model_schedule_split_and_samples(unet_run):
    for path in ("unet/config.json", "scheduler/scheduler_config.json", "split.json", "samples/step-000004.png"):
        assert (unet_run / path).is_file(), path
    assert json.loads((unet_run / "scheduler/scheduler_config.json").read_text())["clip_sample"] is False
    split = json.loads((unet_run / "split.json").read_text())
    assert split["source"] == "mnist-bundled" and split["num_heldout"] == 500 and split["num_train"] == 4500
    record = json.loads((unet_run / "training_args.json").read_text())
    assert record["command"].startswith("accelerate launch training_scripts/train_unet.py --output_dir")
    assert record["seconds_per_step"] > 0


def test_num_epochs_sets_the_steps_from_the_data(tmp_path):
    out = tmp_path / "unet"
    launch("train_unet.py", "--output_dir", str(out), "--num_epochs", "2", "--holdout_size", "4950",
           "--save_images_steps", "100", *TINY_UNET)  # fmt: skip
    assert json.loads((out / "training_args.json").read_text())["steps"] == 2 * (50 // 16), "2 epochs, drop_last"


def test_a_fine_tuned_run_counts_the_images_its_weights_saw(unet_run, tmp_path):
    out = tmp_path / "more"
    launch("train_unet.py", "--output_dir", str(out), "--pretrained_model_name_or_path", str(unet_run),
           "--max_train_steps", "2", "--save_images_steps", "100", *TINY_UNET)  # fmt: skip
    record = json.loads((out / "training_args.json").read_text())
    assert record["pretrained_images_seen"] == 4 * 16 and record["images_seen"] == 4 * 16 + 2 * 16


def test_resume_after_a_crash_finishes_the_same_number_of_steps(unet_run, tmp_path):
    run = tmp_path / "unet"
    subprocess.run(["cp", "-r", str(unet_run), str(run)], check=True)
    (run / ".checkpoint-6.partial").mkdir()  # a checkpoint whose write was killed: never "latest"
    result = launch(
        "train_unet.py", "--output_dir", str(run), "--max_train_steps", "6", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "2", "--save_images_steps", "100", "--use_ema", "--resume_from_checkpoint",
        "latest", *TINY_UNET,
    )  # fmt: skip
    assert "Resumed from" in result.stderr and "checkpoint-4 at step 4" in result.stderr
    assert "2/2" in result.stderr  # the progress bar runs steps 5 and 6 only
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]


def test_classifier_run_exports_a_loadable_pipeline_with_a_model_card(unet_run, tmp_path):
    out, pipeline_dir = tmp_path / "classifier", tmp_path / "pipeline"
    result = launch(
        "train_classifier.py", "--unet_model_name_or_path", str(unet_run), "--output_dir", str(out),
        "--pipeline_output_dir", str(pipeline_dir), "--max_train_steps", "3", "--checkpointing_steps", "3",
        "--guidance_scale", "4.5", "--num_inference_steps", "3", *TINY_CLASSIFIER,
    )  # fmt: skip
    assert "held-out accuracy of p_phi(label | x_t, t):" in result.stdout
    accuracy = json.loads((out / "heldout_metrics.json").read_text())["label"]
    assert (
        accuracy["metric"] == "accuracy"
        and list(accuracy["levels"])[0] == "0"
        and list(accuracy["levels"])[-1] == "999"
    )
    pipe = DiffSCMPipeline.from_pretrained(pipeline_dir)
    assert pipe.config.guidance_scale == 4.5 and pipe.unet.config.sample_size == 16
    assert pipe.classifier.config.num_classes == 10
    card = (pipeline_dir / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card and "- diffscm" in card
    assert "accelerate launch training_scripts/train_unet.py" in card
    assert "accelerate launch training_scripts/train_classifier.py" in card
    assert "| 999 |" in card and "holds out 500" in card

    oracle_dir = tmp_path / "oracle"
    DigitOracle(channels=(4,)).save_pretrained(oracle_dir)
    evaluate = ["evaluate", "--model", str(pipeline_dir), "--oracle", str(oracle_dir), "--num-samples", "2"]
    main([*evaluate, "--composition-cycles", "1", "--out", str(tmp_path / "eval"), "--quiet", "--write-model-card"])
    card = (pipeline_dir / "README.md").read_text()
    assert "## Evaluation" in card and "| guidance scale | oracle flip rate (2 images) |" in card


def test_two_processes_train_and_only_the_main_one_writes(tmp_path):
    out = tmp_path / "unet"
    result = launch(
        "train_unet.py", "--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "2",
        "--save_images_steps", "100", *TINY_UNET, processes=2,
    )  # fmt: skip
    assert "2 process(es), DistributedType.MULTI_CPU" in result.stderr
    assert (out / "unet" / "config.json").is_file() and [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]


def write_imagefolder(root: Path, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            PIL.Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def test_imagefolder_data_trains_rgb(tmp_path):
    data = write_imagefolder(tmp_path / "data")
    out = tmp_path / "unet"
    launch(
        "train_unet.py", "--train_data_dir", str(data), "--output_dir", str(out), "--num_channels", "3",
        "--holdout_size", "2", "--max_train_steps", "2", "--save_images_steps", "100", *TINY_UNET,
    )  # fmt: skip
    assert json.loads((out / "unet" / "config.json").read_text())["in_channels"] == 3


def write_idx(path: Path, array: np.ndarray):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(size.to_bytes(4, "big") for size in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_morphomnist_folder_loads_with_morphometry(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    rows = "\n".join(f"{i},{1.5 + i},{100 + i}" for i in range(5))
    (tmp_path / "t10k-morpho.csv").write_text("index,thickness,intensity\n" + rows + "\n")
    ds = load_image_dataset(train_data_dir=str(tmp_path))
    assert len(ds) == 5 and ds[3]["label"] == 3 and ds[3]["thickness"] == pytest.approx(4.5)
    assert np.array_equal(np.asarray(ds[2]["image"]), images[2])
    split = split_dataset(ds, 2, seed=0)
    assert len(split["heldout"]) == 2 and set(split["heldout"]["source_index"]).isdisjoint(
        split["train"]["source_index"]
    )


def test_the_repositorys_morphomnist_folder_loads():
    ds = load_image_dataset(train_data_dir=str(ROOT / "data" / "morphomnist"))
    assert len(ds) == 10_000 and set(ds.column_names) >= {"image", "label", "thickness", "intensity"}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--train_data_dir", "/no/such/folder"], "does not exist"),
        (["--dataset", "cifar-bundled"], "unknown --dataset"),
        (["--max_train_steps", "0"], "--max_train_steps must be >= 1"),
        (["--save_images_steps", "0"], "--save_images_steps must be >= 1"),
        (["--semantic_latent_dim", "4"], "--semantic_latent_dim conditions the noise model beside the parents"),
        (["--semantic_kl_weight", "-1"], "must be >= 0"),
    ],
)
def test_bad_arguments_fail_fast(tmp_path, args, message):
    result = launch("train_unet.py", "--output_dir", str(tmp_path / "out"), *args, check=False)
    assert result.returncode != 0 and message in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--causal_graph", "/no/such/graph.json"], "--causal_graph '/no/such/graph.json'"),
        (["--causal_graph", "morphomnist", "--guidance_scale", "width=3"], "NAME=SCALE pairs for the parents"),
        (["--guidance_scale", "digit=3"], "NAME=SCALE pairs for the parents ['label']"),
        (["--guidance_scale", "strong"], "--guidance_scale takes a number or NAME=NUMBER"),
        (["--causal_graph", "morphomnist", "--guidance_scale", "digit=x"], "NAME=NUMBER pairs"),
    ],
)
def test_predictor_script_refuses_bad_graphs_and_scales(unet_run, tmp_path, capsys, args, message):
    sys.path.insert(0, str(ROOT / "training_scripts"))
    from train_classifier import parse_args

    base = ["--unet_model_name_or_path", str(unet_run), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as error:
        parse_args(base + args)
    assert message in str(error.value) + capsys.readouterr().err


@pytest.mark.parametrize(
    "graph, pretrained, message",
    [
        ("digit", "diffscm-morphomnist", "an AntiCausalPredictor; this run's graph needs an AntiCausalClassifier"),
        ("morphomnist", "diffscm-mnist", "an AntiCausalClassifier; this run's graph needs an AntiCausalPredictor"),
    ],
)
def test_a_predictor_of_the_other_kind_is_refused_not_loaded_with_fresh_weights(graph, pretrained, message):
    sys.path.insert(0, str(ROOT / "training_scripts"))
    from train_classifier import load_or_build_predictor

    from diffscm import CausalGraph

    model = {"resolution": 28, "num_channels": 1, "block_out_channels": [16, 32, 64], "layers_per_block": 1}
    args = argparse.Namespace(**model, num_classes=None, pretrained_model_name_or_path=str(CHECKPOINTS / pretrained))
    with pytest.raises(ValueError, match=message):
        load_or_build_predictor(args, CausalGraph.load(graph), None)


def test_classifier_refuses_a_schedule_or_split_that_disagrees_with_the_unet(unet_run, tmp_path):
    out = tmp_path / "classifier"
    out.mkdir()
    (out / "noise_schedule.json").write_text(json.dumps({"num_train_timesteps": 100}))
    common = ["--unet_model_name_or_path", str(unet_run), "--max_train_steps", "1", *TINY_CLASSIFIER]
    result = launch("train_classifier.py", "--output_dir", str(out), *common, check=False)
    assert result.returncode != 0 and "disagrees with the one this classifier was trained on" in result.stderr
    result = launch(
        "train_classifier.py", "--output_dir", str(tmp_path / "c2"), "--split_seed", "5", *common, check=False
    )
    assert result.returncode != 0 and "differs from the UNet run's" in result.stderr
    result = launch(
        "train_classifier.py", "--output_dir", str(out), "--unet_model_name_or_path", str(tmp_path), check=False
    )
    assert result.returncode != 0 and "has no scheduler/" in result.stderr


@pytest.mark.parametrize(
    "script, model_args, record",
    [
        ("train_oracle.py", ["--channels", "4", "8"], "oracle.json"),
        ("train_vae.py", ["--channels", "4", "8", "--latent_dim", "2"], "vae.json"),
    ],
)
def test_judges_train_and_export_with_cards(tmp_path, script, model_args, record):
    export = tmp_path / "judge"
    launch(
        script, "--output_dir", str(tmp_path / "run"), "--export_dir", str(export), "--max_train_steps", "2",
        "--train_batch_size", "8", *model_args,
    )  # fmt: skip
    data = json.loads((export / record).read_text())
    assert data["split"]["num_heldout"] == 500 and data["command"].startswith(
        f"accelerate launch training_scripts/{script}"
    )
    assert (export / "config.json").is_file() and f"training_scripts/{script}" in (export / "README.md").read_text()


def write_morphomnist_like(folder: Path, count: int = 40) -> Path:
    """Bars of sampled thickness whose intensity follows the Morpho-MNIST mechanism, in the data set's file layout."""
    rng = np.random.default_rng(0)
    thickness = 0.5 + rng.gamma(10, 1 / 5, count)
    intensity = 64 + 191 / (1 + np.exp(-(0.5 * rng.normal(size=count) + 2 * thickness - 5)))
    images = np.zeros((count, 28, 28))
    for i, (t, level) in enumerate(zip(thickness, intensity, strict=True)):
        width = max(1, round(t))
        images[i, 5:23, 14 - width // 2 : 14 - width // 2 + width] = level
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", images)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, count))
    rows = "\n".join(f"{i},{t},{level}" for i, (t, level) in enumerate(zip(thickness, intensity, strict=True)))
    (folder / "t10k-morpho.csv").write_text("index,thickness,intensity\n" + rows + "\n")
    return folder


def test_causal_graph_pipeline_trains_intervenes_and_evaluates(tmp_path):
    data = write_morphomnist_like(tmp_path / "morpho")
    tiny = ["--train_data_dir", str(data), "--holdout_size", "8", "--block_out_channels", "8", "16"]
    tiny += ["--train_batch_size", "8", "--report_to", "none"]
    unet, run, pipeline_dir = tmp_path / "unet", tmp_path / "predictor", tmp_path / "pipeline"
    launch("train_unet.py", "--output_dir", str(unet), "--max_train_steps", "2", "--save_images_steps", "100", *tiny)
    result = launch(
        "train_classifier.py", "--unet_model_name_or_path", str(unet), "--output_dir", str(run),
        "--pipeline_output_dir", str(pipeline_dir), "--causal_graph", "morphomnist", "--max_train_steps", "2",
        "--guidance_scale", "digit=2", "thickness=3", "intensity=1", "--num_inference_steps", "2", *tiny,
    )  # fmt: skip
    assert "held-out mae of p_phi(thickness | x_t, t):" in result.stdout
    metrics = json.loads((run / "heldout_metrics.json").read_text())
    assert {name: m["metric"] for name, m in metrics.items()} == {
        "thickness": "mae", "intensity": "mae", "digit": "accuracy"
    }  # fmt: skip
    pipe = DiffSCMPipeline.from_pretrained(pipeline_dir)
    assert pipe.guidance_scales() == {"thickness": 3.0, "intensity": 1.0, "digit": 2.0}
    assert pipe.classifier.parents["thickness"]["conditions"] == ["intensity"], "thickness is read given intensity"
    card = (pipeline_dir / "README.md").read_text()
    assert "thickness -> intensity" in card and "thickness mae" in card

    image = tmp_path / "digit.png"
    PIL.Image.fromarray(np.asarray(load_image_dataset(train_data_dir=str(data))[0]["image"])).save(image)
    out = tmp_path / "cf"
    main(
        [
            "counterfactual",
            str(image),
            "--model",
            str(pipeline_dir),
            "--intervention",
            "thickness=4",
            "--out",
            str(out),
        ]
    )
    assert (out / "digit_do_thickness4.png").is_file()
    with pytest.raises(SystemExit, match="use `intervention="):
        main(["counterfactual", str(image), "--model", str(pipeline_dir), "--target", "3", "--out", str(out) + "2"])

    demo = tmp_path / "demo"
    main(["demo", "--model", str(pipeline_dir), "--data-dir", str(data), "--num-digits", "2", "--out", str(demo)])
    table = (demo / "interventions.md").read_text()
    assert "| do(thickness=1.3) |" in table and "| do(digit=next) |" in table
    assert PIL.Image.open(demo / "counterfactuals.png").size == (7 * 28 * 4, 14 + 2 * 28 * 4)  # x, null, 5 do()
    with pytest.raises(SystemExit, match="split was drawn from 40 images"):  # the default: the repository's 10,000
        main(["demo", "--model", str(pipeline_dir), "--out", str(demo)])

    report, oracle = tmp_path / "report", tmp_path / "oracle"
    DigitOracle(channels=(4, 8)).save_pretrained(oracle)
    main([
        "evaluate-scm", "--model", str(pipeline_dir), "--data-dir", str(data), "--oracle", str(oracle),
        "--num-samples", "4", "--skip", "2", "--composition-samples", "2", "--composition-cycles", "2",
        "--out", str(report), "--quiet",
    ])  # fmt: skip
    result = json.loads((report / "metrics.json").read_text())
    assert set(result) >= {"do(thickness)", "do(intensity)", "do(digit)", "composition", "factual"}
    assert result["settings"]["num_images"] == 4 and "ground_truth_l1" in result["do(thickness)"]
    assert set(result["do(digit)"]) >= {"benchmark", "benchmark (batch statistics)", "morphometrics", "reversibility"}
    assert result["settings"]["unet_evaluations_per_counterfactual"] == 2 + 2  # 2 steps, no refinement, each way
    truth = result["do(intensity)"]["ground-truth counterfactual"]
    assert truth["morphometrics"]["intensity_mae"] < 1 < result["do(intensity)"]["unchanged image"]["morphometrics"][
        "intensity_mae"], "the data's own process sets the intensity that the unchanged image lacks"  # fmt: skip
    table = (report / "report.md").read_text()
    assert "| benchmark, on the ground-truth counterfactual (the floor) |" in table
    assert "| composition L1, 1 cycle" in table and "| composition L1, 2 cycles ↓ |" in table
    assert "10 cycles" not in table and "nan" not in table, "2 cycles measured: no 10-cycle row beside the published"


def test_conditional_mechanism_trains_with_redrawn_digits_and_exports(tmp_path):
    data = write_morphomnist_like(tmp_path / "morpho")
    redrawn = tmp_path / "redrawn"
    subprocess.run(
        [sys.executable, str(ROOT / "training_scripts" / "redraw_morphomnist.py"), "--train_data_dir", str(data),
         "--variants", "2", "--num_proc", "1", "--output_dir", str(redrawn)],
        check=True, capture_output=True, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert len(load_image_dataset(train_data_dir=str(redrawn))) == 2 * len(
        load_image_dataset(train_data_dir=str(data))
    )
    tiny = ["--train_data_dir", str(data), "--holdout_size", "8", "--block_out_channels", "8", "16"]
    tiny += ["--train_batch_size", "8", "--report_to", "none"]
    unet, run, pipeline_dir = tmp_path / "unet", tmp_path / "predictor", tmp_path / "pipeline"
    launch(
        "train_unet.py", "--output_dir", str(unet), "--causal_graph", "morphomnist", "--extra_train_data_dir",
        str(redrawn), "--max_train_steps", "2", "--save_images_steps", "2", "--prediction_type", "v_prediction",
        "--eval_batch_size", "6", *tiny,
    )  # fmt: skip
    assert (unet / "parent_embedding" / "config.json").is_file()
    assert PIL.Image.open(unet / "samples" / "step-000002.png").size == (3 * 28, 2 * 28), "6 samples, 2 rows"
    split = json.loads((unet / "split.json").read_text())
    assert split["extra_train_sources"] == [str(redrawn)] and split["num_heldout"] == 8
    assert split["num_train"] == split["num_images"] - 8 + 2 * split["num_images"], "redrawn digits train only"
    launch(
        "train_classifier.py", "--unet_model_name_or_path", str(unet), "--output_dir", str(run),
        "--pipeline_output_dir", str(pipeline_dir), "--causal_graph", "morphomnist", "--max_train_steps", "2",
        "--guidance_scale", "0", "--cfg_scale", "digit=2", "--num_inference_steps", "2", *tiny,
    )  # fmt: skip
    pipe = DiffSCMPipeline.from_pretrained(pipeline_dir)
    assert pipe.mechanism == "conditional" and pipe.cfg_scales() == {"thickness": 1.0, "intensity": 1.0, "digit": 2.0}
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    commands = json.loads((pipeline_dir / "training.json").read_text())["commands"]
    scripts = [Path(c.split()[1 if c.startswith("python") else 2]).name for c in commands]
    assert scripts == ["redraw_morphomnist.py", "train_unet.py", "train_classifier.py"], "data, UNet, predictor"
    image = load_image_dataset(train_data_dir=str(data))[0]["image"]
    out = pipe(image, intervention={"digit": 3}, factual_values={"thickness": 2.0, "intensity": 150.0, "digit": 1})
    assert out.counterfactual_values["digit"].tolist() == [3] and len(out.images) == 1
    main(
        [
            "evaluate-scm",
            "--model",
            str(pipeline_dir),
            "--data-dir",
            str(data),
            "--num-samples",
            "2",
            "--composition-samples",
            "1",
            "--composition-cycles",
            "1",
            "--out",
            str(tmp_path / "eval"),
            "--quiet",
            "--write-model-card",
        ]
    )
    fidelity = json.loads((tmp_path / "eval" / "metrics.json").read_text())["generation_fidelity"]
    recorded = json.loads((pipeline_dir / "training.json").read_text())["generation_fidelity"]
    assert recorded["results"] == fidelity and recorded["command"].startswith("diffscm evaluate-scm")
    assert list(fidelity) == ["cfg 1", "cfg {'thickness': 1.0, 'intensity': 1.0, 'digit': 2.0}"]
    assert set(fidelity["cfg 1"]) >= {"benchmark", "morphometrics"}, "the benchmark's judges read the mechanism"
    assert "The mechanism alone (fresh noise" in (tmp_path / "eval" / "report.md").read_text()


def test_digit_conditional_pipeline_fine_tunes_a_classifier_guided_ones_classifier(unet_run, tmp_path):
    unet, guided, pipeline_dir = tmp_path / "unet", tmp_path / "guided", tmp_path / "pipeline"
    launch("train_unet.py", "--output_dir", str(unet), "--causal_graph", "digit", "--max_train_steps", "2", *TINY_UNET)
    launch(
        "train_classifier.py", "--unet_model_name_or_path", str(unet_run), "--output_dir", str(tmp_path / "c1"),
        "--pipeline_output_dir", str(guided), "--max_train_steps", "2", *TINY_CLASSIFIER,
    )  # fmt: skip
    launch(
        "train_classifier.py", "--unet_model_name_or_path", str(unet), "--output_dir", str(tmp_path / "c2"),
        "--pipeline_output_dir", str(pipeline_dir), "--causal_graph", "digit", "--pretrained_model_name_or_path",
        str(guided), "--max_train_steps", "2", "--cfg_scale", "digit=3", "--num_inference_steps", "2",
        *TINY_CLASSIFIER,
    )  # fmt: skip
    pipe = DiffSCMPipeline.from_pretrained(pipeline_dir)
    assert pipe.mechanism == "conditional" and pipe.classifier.parents == {
        "digit": {"type": "categorical", "num_classes": 10}
    }, "the guided pipeline's label classifier now predicts the graph's digit"
    commands = json.loads((pipeline_dir / "training.json").read_text())["commands"]
    runs = [next(c.split()[i + 1] for i, w in enumerate(c.split()) if w == "--output_dir") for c in commands]
    in_order = [str(unet_run), str(tmp_path / "c1"), str(unet), str(tmp_path / "c2")]  # the base pipeline's runs first
    assert runs == in_order, "every run that remakes it, in the order they ran"
    out = pipe(torch.zeros(1, 16, 16), target=3, output_type="pt")
    assert out.counterfactual_values["digit"].tolist() == [3] and out.images.shape == (1, 1, 16, 16)

    DigitOracle(channels=(4,)).save_pretrained(tmp_path / "oracle")
    nfe = {}
    for w in (1, 3):
        out = tmp_path / f"eval-{w}"
        main(["evaluate", "--model", str(pipeline_dir), "--oracle", str(tmp_path / "oracle"), "--num-samples", "2",
              "--composition-cycles", "0", "--cfg-scale", f"digit={w}", "--out", str(out), "--quiet"])  # fmt: skip
        result = json.loads((out / "metrics.json").read_text())
        assert result["cfg_scale"] == {"digit": w}
        nfe[w] = result["abduction_nfe"]
    assert nfe[3] == 2 * nfe[1], "the abduction follows --cfg-scale: classifier-free guidance doubles its passes"


def test_the_official_release_layout_chooses_a_split(tmp_path):
    for prefix, count in (("train", 3), ("t10k", 2)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", np.zeros((count, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count))
        rows = "\n".join(f"{i},2.0,100.0" for i in range(count))
        (tmp_path / f"{prefix}-morpho.csv").write_text("index,thickness,intensity\n" + rows + "\n")
    assert len(load_morphomnist(str(tmp_path), split="train")) == 3
    assert len(load_morphomnist(str(tmp_path), split="test")) == 2
    with pytest.raises(ValueError, match="choose one with --split"):
        load_morphomnist(str(tmp_path))
    with pytest.raises(ValueError, match="no Morpho-MNIST split 'validation2'"):
        load_morphomnist(str(tmp_path), split="validation2")


def run_args(out: Path, script: str = "train_unet.py", steps: int = 6) -> list[str]:
    """train_unet.py draws sample grids on the checkpoint steps, as the defaults (500 and 500) have them: drawing
    samples must not move the training's random state after a checkpoint saved it."""
    samples = ["--save_images_steps", "2"] if script == "train_unet.py" else []
    return ["--output_dir", str(out), "--max_train_steps", str(steps), "--checkpointing_steps", "2", *samples,
            "--use_ema", "--report_to", "none", *TINY_UNET]  # fmt: skip


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    first, second = load_file(str(a)), load_file(str(b))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("script, model", [("train_unet.py", "unet"), ("train_classifier.py", "classifier")])
def test_a_run_killed_at_a_random_step_resumes_bit_exactly(unet_run, tmp_path, script, model):
    """Each script with its default flags but for the step counts: killed after a checkpoint (mid-step or mid-write),
    resumed, it ends on the uninterrupted run's very weights."""
    source = [] if script == "train_unet.py" else ["--unet_model_name_or_path", str(unet_run)]
    reference = tmp_path / "reference"
    launch(script, *source, *run_args(reference, script))
    killed = tmp_path / "killed"
    command = [sys.executable, str(ROOT / "training_scripts" / script), *source, *run_args(killed, script)]
    process = subprocess.Popen(command, env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    target = random.choice([2, 4])  # kill it somewhere after this checkpoint, mid-step or mid-write
    while not (killed / f"checkpoint-{target}").is_dir() and process.poll() is None:
        time.sleep(0.05)
    time.sleep(random.uniform(0, 0.5))
    process.send_signal(signal.SIGKILL)
    process.wait()
    result = launch(script, *source, *run_args(killed, script), "--resume_from_checkpoint", "latest")
    assert "Resumed from" in result.stderr
    for name in ("checkpoint-6/model.safetensors", "checkpoint-6/ema.safetensors", f"{model}/" + SAFETENSORS):
        assert same_weights(reference / name, killed / name), name
    assert not list(killed.glob("checkpoint-*/*.pkl")) or all(
        p.name.startswith("random_states") for p in killed.glob("checkpoint-*/*.pkl")
    ), "the EMA is kept as safetensors, never pickled"


def test_sigterm_checkpoints_the_step_it_stopped_at_and_the_run_resumes_bit_exactly(tmp_path):
    steps = ["--max_train_steps", "12", "--checkpointing_steps", "100", "--save_images_steps", "2"]
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    launch("train_unet.py", *run_args(reference), *steps)
    command = [sys.executable, str(ROOT / "training_scripts" / "train_unet.py"), *run_args(stopped), *steps]
    process = subprocess.Popen(command, env=os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    while not (stopped / "samples" / "step-000002.png").is_file() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    [checkpoint] = stopped.glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 2 <= step < 12 and f"Stopped by SIGTERM after step {step}" in stderr
    assert json.loads((stopped / "training_args.json").read_text())["steps"] == step
    launch("train_unet.py", *run_args(stopped), *steps, "--resume_from_checkpoint", "latest")
    assert same_weights(reference / "unet" / SAFETENSORS, stopped / "unet" / SAFETENSORS)


def test_a_broken_latest_checkpoint_is_named_and_the_one_before_is_used(unet_run, tmp_path):
    run = tmp_path / "unet"
    subprocess.run(["cp", "-r", str(unet_run), str(run)], check=True)
    weights = run / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    result = launch("train_unet.py", *run_args(run, steps=4), "--resume_from_checkpoint", "latest")
    assert f"Cannot resume from {run / 'checkpoint-4'}" in result.stderr
    assert "Resumed from" in result.stderr and "checkpoint-2 at step 2" in result.stderr
    (run / "checkpoint-4" / "model.safetensors").write_bytes(
        (unet_run / "checkpoint-4" / "model.safetensors").read_bytes()
    )
    states = run / "checkpoint-4" / "random_states_0.pkl"
    states.write_bytes(states.read_bytes()[:50])  # accelerate alone would only log it and go on with other noise
    result = launch("train_unet.py", *run_args(run, steps=4), "--resume_from_checkpoint", "latest")
    assert f"Cannot resume from {run / 'checkpoint-4'}" in result.stderr and "random_states_0.pkl" in result.stderr
    assert "checkpoint-2 at step 2" in result.stderr
    empty = tmp_path / "empty"
    (empty / "checkpoint-2").mkdir(parents=True)
    result = launch("train_unet.py", *run_args(empty, steps=2), "--resume_from_checkpoint", "latest", check=False)
    assert result.returncode != 0 and "No checkpoint could be read" in result.stderr
    assert str(empty / "checkpoint-2") in result.stderr


class _Hostile:
    """A pickle that, unpickled without torch's allow-list, creates the file named by `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl"])
def test_a_hostile_pickle_in_a_checkpoint_never_runs_and_the_checkpoint_is_named_broken(unet_run, tmp_path, name):
    run = tmp_path / "unet"
    subprocess.run(["cp", "-r", str(unet_run), str(run)], check=True)
    marker = tmp_path / "PWNED"
    torch.save(_Hostile(marker), run / "checkpoint-4" / name)
    result = launch("train_unet.py", *run_args(run, steps=4), "--resume_from_checkpoint", "latest")
    assert not marker.exists(), "the checkpoint's pickle ran"
    assert f"Cannot resume from {run / 'checkpoint-4'}" in result.stderr and "checkpoint-2 at step 2" in result.stderr
    assert "weights_only` set to `False`" not in result.stderr, "torch's advice to unpickle it is not passed on"


@pytest.mark.parametrize("flag", [["--prediction_type", "v_prediction"], ["--learning_rate", "0.1"]])
def test_a_resume_with_another_objective_or_learning_rate_is_refused_by_name(unet_run, tmp_path, flag):
    run = tmp_path / "unet"
    subprocess.run(["cp", "-r", str(unet_run), str(run)], check=True)
    result = launch("train_unet.py", *run_args(run, steps=6), *flag, "--resume_from_checkpoint", "latest", check=False)
    assert result.returncode != 0 and f"{flag[0]} " in result.stderr and "trained with other flags" in result.stderr
    assert not (run / "checkpoint-6").exists(), "refused before training"


def test_a_semantic_encoder_trains_is_kept_by_fine_tuning_and_ships_in_the_pipeline(tmp_path):
    unet, tuned, pipeline_dir = tmp_path / "unet", tmp_path / "tuned", tmp_path / "pipeline"
    common = ["--causal_graph", "digit", "--max_train_steps", "2", *TINY_UNET]
    result = launch("train_unet.py", "--output_dir", str(unet), "--semantic_latent_dim", "3", *common)
    assert "kl=" in result.stderr, "the latent's KL is logged beside the loss"
    assert json.loads((unet / "semantic_encoder" / "config.json").read_text())["latent_dim"] == 3
    refused = launch(
        "train_unet.py", "--output_dir", str(tmp_path / "x"), "--pretrained_model_name_or_path", str(unet),
        "--semantic_latent_dim", "5", *common, check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "reads a latent of 3, not --semantic_latent_dim 5" in refused.stderr
    launch("train_unet.py", "--output_dir", str(tuned), "--pretrained_model_name_or_path", str(unet), *common)
    assert (tuned / "semantic_encoder").is_dir(), "fine-tuning without the flag keeps the encoder"
    launch(
        "train_classifier.py", "--unet_model_name_or_path", str(tuned), "--output_dir", str(tmp_path / "c"),
        "--pipeline_output_dir", str(pipeline_dir), "--causal_graph", "digit", "--max_train_steps", "2",
        "--num_inference_steps", "2", *TINY_CLASSIFIER,
    )  # fmt: skip
    pipe = DiffSCMPipeline.from_pretrained(pipeline_dir)
    assert pipe.semantic_encoder.config.latent_dim == 3
    out = pipe(torch.zeros(2, 1, 16, 16), target=3, output_type="pt", return_reconstruction=True)
    assert out.images.shape == (2, 1, 16, 16) and torch.isfinite(out.reconstructions).all()
