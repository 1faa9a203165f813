"""Your own images, attributes and causal graph, end to end at tiny size: a standard imagefolder with `metadata.csv`
and string classes, a graph file that leaves ranges and mechanisms to the data, both training scripts, and the
pipeline in Python and on the command line."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import pytest
from conftest import ROOT, launch

from diffscm import CausalGraph, DiffSCMPipeline

pytestmark = pytest.mark.slow  # starts both training scripts
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
TINY = ["--resolution", "32", "--num_channels", "3", "--block_out_channels", "8", "16", "--report_to", "none"]
SHAPES_GRAPH = {
    "nodes": [
        {"name": "color", "type": "categorical", "classes": ["red", "green", "blue"]},
        {"name": "size", "type": "continuous", "parents": ["color"]},
        {"name": "shape", "type": "categorical", "classes": ["square", "disc"], "parents": ["color"]},
        {"name": "image", "type": "image", "parents": ["color", "size", "shape"]},
    ]
}


def write_shapes(folder: Path, count: int = 300, seed: int = 0):
    """`count` RGB 32x32 squares and discs as a standard imagefolder: `metadata.csv` with file_name, color (a class
    name), size (pixels, larger for blue) and shape (a class name: red ones mostly squares)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "color", "size", "shape"])
        for i in range(count):
            color = rng.choice(list(COLOURS))
            shape = rng.choice(["square", "disc"], p=[0.9, 0.1] if color == "red" else [0.3, 0.7])
            size = float(np.clip(6 + 3 * list(COLOURS).index(color) + rng.normal(0, 1.5), 3, 15))
            image = PIL.Image.new("RGB", (32, 32))
            box = (16 - size, 16 - size, 16 + size, 16 + size)
            draw = PIL.ImageDraw.Draw(image)
            (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[color])
            image.save(folder / f"{i:04d}.png")
            writer.writerow([f"{i:04d}.png", color, round(size, 3), shape])


def diffscm(*args, model=None) -> subprocess.CompletedProcess:
    """A `diffscm` command as a user types it; with `model`, at the tiny chain's cheap settings."""
    cheap = ["--model", model, "--steps", "2", "--refinement", "0"] if model else []
    command = [sys.executable, "-m", "diffscm.cli", *map(str, [*args, *cheap])]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def shapes_pipeline(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("own-data")
    write_shapes(root / "shapes")
    (root / "graph.json").write_text(json.dumps(SHAPES_GRAPH))
    data = ["--dataset_name", str(root / "shapes"), "--causal_graph", str(root / "graph.json"), *TINY]
    launch(
        "train_unet.py",
        *data,
        "--output_dir",
        str(root / "unet"),
        "--max_train_steps",
        "2",
        "--save_images_steps",
        "2",
        "--eval_batch_size",
        "4",
    )
    launch(
        "train_classifier.py",
        *data,
        "--unet_model_name_or_path",
        str(root / "unet"),
        "--output_dir",
        str(root / "classifier"),
        "--pipeline_output_dir",
        str(root / "pipeline"),
        "--max_train_steps",
        "2",
        "--num_inference_steps",
        "2",
    )
    return root / "pipeline", root / "shapes"


def test_the_graph_takes_its_range_and_mechanism_from_the_data(shapes_pipeline):
    pipe = DiffSCMPipeline.from_pretrained(shapes_pipeline[0])
    size = pipe.causal_graph.nodes["size"]
    sizes = [float(row["size"]) for row in csv.DictReader(open(shapes_pipeline[1] / "metadata.csv"))]
    assert min(sizes) <= size.range[0] < size.range[1] <= max(sizes)
    record = json.loads((shapes_pipeline[0].parent / "unet" / "mechanism_fit.json").read_text())
    assert record["size"]["kind"] == size.mechanism.kind and record["size"]["heldout_mae"] < 2.0
    assert record["shape"]["kind"] == pipe.causal_graph.nodes["shape"].mechanism.kind == "gumbel_max"
    factual = {"color": [0] * 200, "size": [6.0] * 200, "shape": ["square"] * 200}
    moved = pipe.causal_graph.counterfactual(factual, {"color": ["green"] * 100 + ["blue"] * 100})
    assert 6.0 < moved["size"][0] < moved["size"][-1], "green shapes are drawn larger than red, blue than green"
    assert 0.3 < moved["shape"].mean() < 0.95, "red squares redrawn in another colour: discs more often"
    card = (shapes_pipeline[0] / "README.md").read_text()
    assert 'intervention={"color": "blue"}' in card and "3 classes (red, green, blue)" in card


def test_an_intervention_by_class_name_in_python_and_on_the_command_line(shapes_pipeline, tmp_path):
    folder, shapes = shapes_pipeline
    pipe = DiffSCMPipeline.from_pretrained(folder)
    image = PIL.Image.open(shapes / "0000.png")
    out = pipe(
        [image, image],
        intervention={"color": "blue"},
        factual_values={"color": ["red", "red"], "size": [6.0, 6.0], "shape": ["square", "disc"]},
        output_type="np",
    )
    assert out.images.shape == (2, 32, 32, 3)
    assert out.counterfactual_values["color"].tolist() == [2, 2]
    assert np.all(out.counterfactual_values["size"] > 9), "size follows color through the fitted mechanism"
    result = diffscm(
        "counterfactual", shapes / "0000.png", "--intervention", "color=blue", "--out", tmp_path / "cf", model=folder
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "cf" / "0000_do_colorblue.png").is_file() and "color=blue" in result.stdout


def test_a_colour_map_named_by_class_recolours_on_the_command_line(shapes_pipeline, tmp_path):
    folder, shapes = shapes_pipeline
    launch(
        "train_colour_map.py", "--pipeline", folder, "--dataset_name", shapes, "--colour_parents", "color",
        "--reference", "color=red", "--output_dir", tmp_path / "run", "--pipeline_output_dir", tmp_path / "mapped",
        "--max_train_steps", "2", "--report_to", "none",
    )  # fmt: skip
    pipe = DiffSCMPipeline.from_pretrained(tmp_path / "mapped")
    assert pipe.colour_map.config.reference == {"color": 0} and pipe.colour_map.config.num_channels == 3
    result = diffscm(
        "counterfactual", shapes / "0000.png", "--intervention", "color=blue", "--out", tmp_path / "cf",
        model=tmp_path / "mapped",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "cf" / "0000_do_colorblue.png").is_file()
    assert "`color` (reference red)" in (tmp_path / "mapped" / "README.md").read_text()


def test_a_data_set_of_your_own_gets_counterfactuals_with_class_names(shapes_pipeline, tmp_path):
    folder, shapes = shapes_pipeline
    result = diffscm(
        "counterfactual",
        "--dataset",
        shapes,
        "--intervention",
        "color=green",
        "--num-images",
        "4",
        "--out",
        tmp_path / "cf",
        model=folder,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "cf" / "shard-00000" / "metadata.jsonl")]
    assert len(rows) == 4 and all(row["intervention"] == {"color": "green"} for row in rows)
    assert {row["factual"]["color"] for row in rows} <= set(COLOURS)


def test_an_unknown_class_name_names_the_node_and_its_classes(shapes_pipeline):
    pipe = DiffSCMPipeline.from_pretrained(shapes_pipeline[0])
    with pytest.raises(ValueError, match=r"'color' has no class 'purple'.*\['red', 'green', 'blue'\]"):
        pipe(PIL.Image.new("RGB", (32, 32)), intervention={"color": "purple"})


def test_a_graph_without_classes_refuses_string_values_naming_the_node(tmp_path):
    write_shapes(tmp_path / "shapes", count=20)
    graph = {
        "nodes": [
            {"name": "color", "type": "categorical", "num_classes": 3},
            {"name": "image", "type": "image", "parents": ["color"]},
        ]
    }
    (tmp_path / "graph.json").write_text(json.dumps(graph))
    result = launch(
        "train_unet.py",
        "--dataset_name",
        str(tmp_path / "shapes"),
        "--causal_graph",
        str(tmp_path / "graph.json"),
        "--output_dir",
        str(tmp_path / "run"),
        *TINY,
        check=False,
    )
    assert result.returncode != 0
    assert "Node 'color' got the class name" in result.stderr and '"classes"' in result.stderr


def test_the_colour_mnist_graph_file_names_the_classes_and_leaves_the_mechanism_to_the_data():
    graph = CausalGraph.load(str(ROOT / "docs" / "graphs" / "colour-mnist.json"))
    assert not graph.fitted and graph.nodes["digit"].classes[3] == "three"
    assert graph.nodes["hue"].mechanism.kind == "auto"


def test_judges_and_the_evaluation_of_any_graph_write_a_report_with_every_do(shapes_pipeline, tmp_path):
    folder, shapes = shapes_pipeline
    graph_file = tmp_path / "graph.json"
    graph_file.write_text(json.dumps(SHAPES_GRAPH))
    data = ["--dataset_name", str(shapes), "--causal_graph", str(graph_file), *TINY[:4]]
    launch(
        "train_judges.py",
        *data,
        "--output_dir",
        str(tmp_path / "judges-run"),
        "--max_train_steps",
        "2",
        "--channels",
        "8",
        "16",
        "--report_to",
        "none",
    )
    record = json.loads((tmp_path / "judges-run" / "judges" / "judges.json").read_text())
    assert set(record["heldout"]) == {"color_accuracy", "size_mae", "shape_accuracy"}
    assert record["split"]["num_heldout"] == 30
    out = tmp_path / "evaluation"
    result = diffscm(
        "evaluate",
        "--dataset",
        shapes,
        "--judges",
        tmp_path / "judges-run" / "judges",
        "--num-samples",
        "6",
        "--composition-samples",
        "2",
        "--composition-cycles",
        "2",
        "--out",
        out,
        model=folder,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"do(color)", "do(size)", "do(shape)"} <= set(metrics)
    assert set(metrics["composition"]) == {"cycles_1", "cycles_2"}
    assert metrics["do(color)"]["descendants"] == ["shape", "size"] and metrics["do(size)"]["descendants"] == []
    fidelity = metrics["generation_fidelity"]["cfg 1"]
    assert set(fidelity) == {"color_accuracy", "size_mae", "shape_accuracy"}, "the judges read the mechanism alone"
    assert 0 <= fidelity["color_accuracy"] <= 1 and fidelity["size_mae"] >= 0
    report = (out / "report.md").read_text()
    assert "size mae (follows)" in report and "color accuracy (kept)" in report and "unchanged image" in report
    assert "The mechanism alone" in report


def test_evaluating_your_own_data_set_needs_judges(shapes_pipeline, tmp_path):
    folder, shapes = shapes_pipeline
    result = diffscm("evaluate", "--model", str(folder), "--dataset", str(shapes), "--out", str(tmp_path / "e"))
    assert result.returncode != 0 and "--judges" in result.stderr and "train_judges.py" in result.stderr


def test_the_demo_shows_every_do_of_your_own_graph_with_class_names(shapes_pipeline, tmp_path):
    folder, shapes = shapes_pipeline
    result = diffscm("demo", "--dataset", shapes, "--num-digits", "2", "--out", tmp_path / "demo", model=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "demo" / "interventions.md").read_text()
    assert "do(color=next)" in table and "do(size=" in table and ("red" in table or "green" in table)
    assert PIL.Image.open(tmp_path / "demo" / "counterfactuals.png").size[0] > 2 * 6 * 32


def test_the_web_demo_builds_its_values_from_the_graph_and_keeps_colour(shapes_pipeline):
    from diffscm.cli.serve import PREDICTOR_READER, CounterfactualDemo

    demo = CounterfactualDemo({"shapes": str(shapes_pipeline[0])}, device="cpu")
    image, values = demo.example("shapes", 0)
    assert image.mode == "RGB" and set(values) == {"color", "size", "shape"}, "a held-out image of the model's data"
    assert demo.is_scm("shapes") and demo.oracle("shapes") is None
    gallery, grid, table = demo.counterfactuals("shapes", image, {"color": "blue"}, values)
    assert [caption for _, caption in gallery][2] == "do(color=blue)"
    assert gallery[0][0].mode == "RGB", "colour stays colour"
    row = next(line for line in table.splitlines() if line.startswith("| do(color=blue) |"))
    assert row.split("|")[2].strip().startswith("blue / blue / ") and PREDICTOR_READER in table


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")), reason="needs chromium")
def test_a_custom_graph_model_in_a_browser_shows_its_own_controls(shapes_pipeline, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_web import page_in_a_browser, press_and_read_the_page

    with page_in_a_browser({"shapes": str(shapes_pipeline[0])}, tmp_path) as browser:
        wait = WebDriverWait(browser, 120)
        boxes = wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#variables input[type=checkbox]"))
        labels = [box.find_element(By.XPATH, "..").text for box in boxes]
        assert labels == ["color", "size", "shape"], "a box per variable of the graph"
        assert browser.find_elements(By.ID, "do-color") and browser.find_elements(By.ID, "do-size")
        browser.find_element(By.ID, "pick").click()
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#factual img"))
        shown, table, _ = press_and_read_the_page(browser, 3, "do(color=blue)", "web-demo-own-graph.png")
    assert len(shown) == 3 and "blue / blue" in table


def test_train_judges_refuses_a_bad_graph_before_loading_data(tmp_path):
    (tmp_path / "graph.json").write_text(json.dumps({"nodes": [{"name": "a", "type": "continuous", "range": "0-1"}]}))
    result = launch(
        "train_judges.py",
        "--causal_graph",
        str(tmp_path / "graph.json"),
        "--output_dir",
        str(tmp_path / "run"),
        check=False,
    )
    assert result.returncode != 0 and "Node 'a'" in result.stderr and not (tmp_path / "run").exists()


def test_the_issues_trial_as_written_trains_from_train_data_dir_with_string_colours(tmp_path):
    write_shapes(tmp_path / "shapes", count=40)
    graph = {"nodes": [{"name": "color", "type": "categorical", "classes": ["red", "green", "blue"]},
                       {"name": "size", "type": "continuous"},
                       {"name": "image", "type": "image", "parents": ["color", "size"]}]}  # fmt: skip
    (tmp_path / "graph.json").write_text(json.dumps(graph))
    data = ["--train_data_dir", str(tmp_path / "shapes"), "--causal_graph", str(tmp_path / "graph.json")]
    launch("train_unet.py", *data, "--output_dir", str(tmp_path / "run"), "--max_train_steps", "1",
           "--save_images_steps", "1", "--eval_batch_size", "4", *TINY)  # fmt: skip
    saved = json.loads((tmp_path / "run" / "causal_graph.json").read_text())
    size = next(node for node in saved["nodes"] if node["name"] == "size")
    assert 3 <= size["range"][0] < size["range"][1] <= 15, "the range the data span, recorded"
    assert json.loads((tmp_path / "run" / "split.json").read_text())["num_heldout"] == 4, "10% of a small data set"
