"""The `diffscm` command with tiny models: demo, counterfactual, evaluate, and their error messages."""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import PIL.Image
import pytest
from conftest import tiny_pipeline

from diffscm import DiffSCMPipeline
from diffscm.cli import main
from diffscm.cli.counterfactual import add_commands as add_counterfactual_commands
from diffscm.cli.evaluate import add_commands as add_evaluate_commands
from diffscm.evaluation import DigitOracle, DigitVAE
from diffscm.options import describe_machine, device_and_dtype


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny 28x28, 10-class pipeline with a recorded held-out split, and a tiny oracle."""
    root = tmp_path_factory.mktemp("models")
    pipe = tiny_pipeline(size=28, num_classes=10, num_inference_steps=2, guidance_scale=1.0)
    pipe.save_pretrained(root / "pipeline")
    split = {"source": "mnist-bundled", "heldout_indices": [3, 10, 42, 1000, 1001]}
    (root / "pipeline" / "training.json").write_text(json.dumps({"split": split}))
    DigitOracle(channels=(4, 8)).save_pretrained(root / "oracle")
    DigitVAE(channels=(4, 8), latent_dim=2).save_pretrained(root / "vae")
    return root / "pipeline", root / "oracle"


def test_demo_writes_grid_and_oracle_table(model_dirs, tmp_path, capsys):
    pipeline_dir, oracle_dir = model_dirs
    out = tmp_path / "demo"
    main(["demo", "--model", str(pipeline_dir), "--oracle", str(oracle_dir), "--num-digits", "3", "--out", str(out)])
    grid = PIL.Image.open(out / "counterfactuals.png")
    assert grid.size == (12 * 28 * 3, 14 + 3 * 28 * 3)  # columns: x, null, do(0..9); three rows
    table = (out / "oracle.md").read_text()
    assert table.count("\n| ") == 4 and "| label | x | null | do(0) |" in table
    assert str(out / "counterfactuals.png") in capsys.readouterr().out


def test_demo_writes_a_folder_per_model_with_a_row_per_held_out_class(model_dirs, tmp_path, monkeypatch):
    pipeline_dir, oracle_dir = model_dirs
    monkeypatch.chdir(tmp_path)
    main(["demo", "--model", str(pipeline_dir), "--oracle", str(oracle_dir), "--quiet"])
    grid = PIL.Image.open(tmp_path / "diffscm-demo" / pipeline_dir.name / "counterfactuals.png")
    assert grid.size == (12 * 28 * 3, 14 + 5 * 28 * 3), "one row per class among the 5 held-out digits"


def test_counterfactual_command_writes_one_file_per_target(model_dirs, tmp_path):
    pipeline_dir, _ = model_dirs
    rgb = tmp_path / "seven.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(rgb)
    grey = tmp_path / "one.jpg"
    PIL.Image.new("L", (28, 28), 20).save(grey)
    out = tmp_path / "cf"
    main(["counterfactual", str(rgb), str(grey), "--target", "all", "--model", str(pipeline_dir), "--out", str(out)])
    assert sorted(p.name for p in out.glob("seven_do*.png")) == [f"seven_do{k}.png" for k in range(10)]
    assert len(list(out.glob("one_do*.png"))) == 10
    main(
        [
            "counterfactual",
            str(grey),
            "--target",
            "3",
            "--model",
            str(pipeline_dir),
            "--out",
            str(out),
            "--reconstruction",
            "--overwrite",  # one_do3.png is the first run's
        ]
    )
    assert PIL.Image.open(out / "one_do3.png").size == (28, 28) and (out / "one_null.png").is_file()


def test_evaluate_writes_metrics_and_report(model_dirs, tmp_path):
    pipeline_dir, oracle_dir = model_dirs
    out = tmp_path / "eval"
    main([
        "evaluate", "--model", str(pipeline_dir), "--oracle", str(oracle_dir), "--vae", str(oracle_dir.parent / "vae"),
        "--num-samples", "3",
        "--guidance-scales", "0", "2", "--sweep-samples", "2", "--composition-samples", "2", "--composition-cycles",
        "2", "--abduction-settings", "2:0", "2:1", "--out", str(out), "--quiet",
    ])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and list(metrics["scales"]) == ["1.0"]  # the model's own scale
    assert metrics["sweep"]["num_images"] == 2 and set(metrics["sweep"]["scales"]) == {"0.0", "1.0", "2.0"}
    entry = metrics["sweep"]["scales"]["2.0"]
    assert entry["nfe_per_counterfactual"] == 4 and entry["classifier_gradients_per_counterfactual"] == 2
    assert metrics["sweep"]["scales"]["0.0"]["classifier_gradients_per_counterfactual"] == 0
    assert entry["flip_rate"] in (0, 0.5, 1) and metrics["null_intervention"]["l1_grey_levels"] > 0
    assert set(metrics["composition"]) == {"cycles_1", "cycles_2"} and metrics["reversibility"]["guidance_scale"] == 1
    assert all(np.isfinite(value) for value in entry["realism"].values()) and set(entry["realism"]) == {
        "frechet_distance",
        "kid",
    }
    assert set(entry["cld"]) == {"paper", "benchmark"} and all(np.isfinite(v) for v in entry["cld"].values())
    report = (out / "report.md").read_text()
    assert "Guidance-scale sweep" in report and "Composition after 2 null-intervention cycle(s)" in report
    assert [p["nfe_round_trip"] for p in metrics["abduction_curve"]] == [4, 6]  # 2 + 2 and 2 * (1 + 1) + 2
    assert (out / "guidance_sweep.png").is_file() and (out / "abduction_curve.png").is_file()


def test_a_small_evaluation_is_quick_and_the_long_curves_are_asked_for(model_dirs, tmp_path):
    pipeline_dir, oracle_dir = model_dirs
    base = ["evaluate", "--model", str(pipeline_dir), "--oracle", str(oracle_dir), "--num-samples", "3", "--quiet"]
    main([*base, "--out", str(tmp_path / "quick")])
    quick = json.loads((tmp_path / "quick" / "metrics.json").read_text())
    assert set(quick["composition"]) == {"cycles_1"} and not quick["abduction_curve"]
    assert not (tmp_path / "quick" / "abduction_curve.png").exists()
    main([*base, "--curves", "--abduction-settings", "2:0", "--out", str(tmp_path / "curves")])
    curves = json.loads((tmp_path / "curves" / "metrics.json").read_text())
    assert set(curves["composition"]) == {"cycles_1", "cycles_10"} and len(curves["abduction_curve"]) == 1


def test_an_evaluation_makes_its_settings_the_models_defaults(model_dirs, tmp_path):
    """`--save-defaults`: the settings the report measured become the folder's, and its command is recorded."""
    _, oracle_dir = model_dirs
    folder = tmp_path / "pipeline"
    shutil.copytree(model_dirs[0], folder)
    argv = ["evaluate", "--model", str(folder), "--oracle", str(oracle_dir), "--num-samples", "2", "--quiet",
            "--integrator", "bdia", "--num-inference-steps", "3", "--no-hold-unchanged-parents", "--save-defaults",
            "--out", str(tmp_path / "e")]  # fmt: skip
    with mock.patch.object(sys, "argv", ["diffscm", *argv]):
        main(argv)
    pipe = DiffSCMPipeline.from_pretrained(folder)
    assert (pipe.config.integrator, pipe.config.num_inference_steps, pipe.config.hold_unchanged_parents) == (
        "bdia", 3, False
    )  # fmt: skip
    assert pipe.config.guidance_scale == 1.0, "a setting not given keeps its value"
    record = json.loads((folder / "training.json").read_text())
    assert "--save-defaults" in record["defaults_command"] and "integrator` bdia" in (folder / "README.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["counterfactual", "missing.png", "--target", "1"], "No such image file"),
        (["counterfactual", "{text}", "--target", "1"], "Cannot read"),
        (["counterfactual", "{image}", "--target", "12"], "class in 0..9"),
        (["counterfactual", "{image}", "--target", "three"], "class in 0..9"),
        (["counterfactual", "{image}", "--target", "1", "--model", "{tmp}"], "not a DiffSCMPipeline"),
        (["counterfactual", "{image}", "--target", "1", "--steps", "0"], "num_inference_steps"),
        (["evaluate", "--num-samples", "1"], "--num-samples must be >= 2"),
        (["evaluate", "--sweep-samples", "0"], "--sweep-samples"),
        (["evaluate", "--composition-cycles", "-1"], "--composition-cycles"),
        (["demo", "--num-digits", "0"], "--num-digits"),
        (["evaluate", "--abduction-settings", "20"], "STEPS:REFINEMENT"),
        (["evaluate", "--model", "{pipeline}", "--oracle", "{oracle}", "--data-dir", "/no/such"], "is not a folder"),
        (["evaluate", "--model", "{pipeline}", "--save-defaults"], "saves the settings given"),
        (["evaluate-scm", "--model", "someone/model", "--integrator", "bdia", "--save-defaults"], "local pipeline"),
    ],
)
def test_errors_are_clear(model_dirs, tmp_path, capsys, argv, message):
    text, image = tmp_path / "notes.png", tmp_path / "digit.png"
    text.write_text("not an image")
    PIL.Image.new("L", (28, 28)).save(image)
    names = {"text": text, "image": image, "tmp": tmp_path, "pipeline": model_dirs[0], "oracle": model_dirs[1]}
    argv = [arg.format(**names) for arg in argv]
    if argv[0] == "counterfactual" and "--model" not in argv:
        argv += ["--model", str(model_dirs[0])]
    with pytest.raises(SystemExit) as excinfo:
        main(argv + ["--out", str(tmp_path / "out")])
    assert message in str(excinfo.value)


def test_benchmark_reports_name_the_chip_they_ran_on(monkeypatch):
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    described = describe_machine("cpu")
    assert described.endswith(f", cpu, 3 CPU threads, torch {torch.__version__}")
    chip = described.split(" (")[0]
    assert chip and chip != "cpu", "the CPU by its model name, which two machines of one architecture differ in"


@pytest.mark.slow
def test_benchmark_script_writes_ratios(model_dirs, tmp_path):
    pipeline_dir, oracle_dir = model_dirs
    out = tmp_path / "benchmarks.md"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark_settings.py"
    command = [sys.executable, str(script), "--model", str(pipeline_dir), "--oracle", str(oracle_dir)]
    command += ["--num-samples", "2", "--reuse-samples", "1", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
    table = out.read_text()
    assert "(a) paper: 1000 + 1000 steps" in table and "| 2000 |" in table  # 1000 inversion + 1000 guided NFE
    assert "(b) official code" in table and "| 150 |" in table  # 75 + 75 steps at strength 0.75
    assert "one abduction shared by the 10 targets" in table
    data = json.loads(out.with_suffix(".json").read_text())
    reuse = data["reuse"]
    assert reuse["one_abduction_nfe_per_cf"] < reuse["separate_calls_nfe_per_cf"]


@pytest.mark.parametrize(
    "script, arguments, message",
    [
        ("throughput.py", ["--chains", "25"], "--chains takes STEPS:K"),
        ("throughput.py", ["--chains", "25:one"], "--chains takes STEPS:K"),
        ("throughput.py", ["--chains", "25:1:10"], "TARGETS must be 1 to 9"),
        ("throughput.py", ["--chains", "rk4/25:0"], "names the integrator 'rk4'"),
        ("throughput.py", ["--dtypes", "bfloat16"], "must include float32"),
        ("tune_scm_guidance.py", ["--model", "user/diffscm-hub-id", "--save-defaults"], "local pipeline folder"),
    ],
)
def test_benchmark_scripts_refuse_bad_requests_before_any_work(script, arguments, message, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    module = __import__(script.removesuffix(".py"))
    with pytest.raises(SystemExit):
        module.parse_args(arguments)
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_throughput_benchmark_reports_rates_and_the_chain(model_dirs, tmp_path):
    pipeline_dir, _ = model_dirs
    out = tmp_path / "throughput.md"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
    command = [sys.executable, str(script), "--model", str(pipeline_dir), "--num-samples", "2", "--batch-sizes", "1",
               "2", "--dtypes", "float32", "--chains", "2:0", "2:1", "2:1:4:0", "bdia/3:0", "residual/3:0",
               "--out", str(out)]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=600, env=os.environ | {"OMP_NUM_THREADS": "1"})
    data = json.loads(out.with_suffix(".json").read_text())
    assert [row["batch_size"] for row in data["throughput"]] == [1, 2]
    # 2 + 2, 2 * (1 + 1) + 2, 4 / 4 + 2 (shared), 3 + 3, (3 + 1) + 3
    assert [row["nfe"] for row in data["chains"]] == [4, 6, 3, 6, 7]
    assert data["chains"][3]["integrator"] == "bdia" and data["chains"][3]["null_l1"] < 0.01
    assert data["chains"][4]["integrator"] == "residual" and data["chains"][4]["null_l1"] < 0.01
    assert data["chains"][2]["targets_per_abduction"] == 4 and data["chains"][2]["guidance_scale"] == {"label": 0.0}
    assert "official code" in out.read_text() and all(
        row["counterfactuals_per_second"] > 0 for row in data["throughput"]
    )
    assert 0 < data["gflop_per_pass"] < 0.378 and data["peak_gflops"]["float32"] > 0  # tinier than MNIST's UNet
    assert "The physical limit" in out.read_text() and "| limit cf / s |" in out.read_text()


@pytest.mark.parametrize(
    "device, amx, avx512_bf16, expected",
    [("cpu", True, False, "bfloat16"), ("cpu", False, True, "bfloat16"), ("cpu", False, False, "float32")],
)
def test_dtype_auto_takes_bfloat16_only_where_the_cpu_computes_it_natively(device, amx, avx512_bf16, expected):
    import torch

    with (
        mock.patch.object(torch.cpu, "_is_amx_tile_supported", lambda: amx),
        mock.patch.object(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16),
    ):
        assert device_and_dtype(argparse.Namespace(device=device, dtype="auto")) == (device, expected)
    assert device_and_dtype(argparse.Namespace(device="cpu", dtype="float16")) == ("cpu", "float16"), "given: kept"


def test_the_counterfactual_command_defaults_to_the_native_dtype_and_the_measurements_to_float32():
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers()
    add_counterfactual_commands(commands)
    add_evaluate_commands(commands)
    assert parser.parse_args(["counterfactual", "x.png", "--target", "1"]).dtype == "auto"
    assert parser.parse_args(["evaluate"]).dtype == "float32"
    assert parser.parse_args(["evaluate-scm"]).dtype == "float32"
