"""The shipped pipelines and judges load and behave (real weights, a few held-out digits, few steps)."""

import json
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from diffscm import DiffSCMPipeline
from diffscm.data import load_bundled_mnist
from diffscm.evaluation import DigitOracle
from diffscm.evaluation.metrics import oracle_predictions
from diffscm.folder_format import installed_code_shims, missing_remote_code, unet_passes

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


@pytest.fixture(scope="module", params=["diffscm-mnist", "diffscm-mnist-conditional"])
def pipe(request) -> DiffSCMPipeline:
    pipe = DiffSCMPipeline.from_pretrained(CHECKPOINTS / request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def heldout(pipe):
    record = json.loads((CHECKPOINTS / "diffscm-mnist" / "training.json").read_text())
    indices = record["split"]["heldout_indices"]
    assert len(indices) >= 500 and record["split"]["num_train"] + len(indices) == 5000
    dataset = load_bundled_mnist()
    rows = [dataset[i] for i in indices[:6]]
    images = torch.stack(
        [torch.tensor(list(row["image"].getdata()), dtype=torch.float32).view(1, 28, 28) for row in rows]
    )
    return images / 255, torch.tensor([row["label"] for row in rows])


def test_shipped_pipeline_records_its_measured_defaults_and_card(pipe):
    assert pipe.unet.config.sample_size == 28 and pipe.classifier.config.num_classes == 10
    assert all(scale > 0 for scale in pipe.guidance_scales().values())
    cfg_passes = sum(scale != 1 for scale in pipe.cfg_scales().values())
    config = pipe.config
    nfe = unet_passes(config.num_inference_steps, config.abduction_refinement_steps, config.integrator, cfg_passes)
    assert nfe <= 100, "the issue's budget: at most 100 UNet evaluations per counterfactual"
    card = (Path(pipe.config._name_or_path) / "README.md").read_text()
    assert "accelerate launch training_scripts/train_unet.py" in card and "## Evaluation" in card
    assert (Path(pipe.config._name_or_path) / "evaluation.md").is_file(), "the card carries a measured report"


def test_shipped_oracle_is_accurate_and_recorded():
    record = json.loads((CHECKPOINTS / "mnist-oracle" / "oracle.json").read_text())
    assert record["heldout_accuracy"] >= 0.99 and record["split"]["num_heldout"] >= 500
    assert "train_oracle.py" in (CHECKPOINTS / "mnist-oracle" / "README.md").read_text()


def test_null_intervention_reconstructs_and_guidance_flips_the_oracle(pipe, heldout):
    images, labels = heldout
    oracle = DigitOracle.from_pretrained(CHECKPOINTS / "mnist-oracle").eval()
    targets = (labels + 1) % 10
    out = pipe(images, targets, output_type="pt", return_reconstruction=True)
    assert (out.reconstructions - images).abs().mean() * 255 < 3  # grey levels
    assert (oracle_predictions(oracle, out.reconstructions) == labels).all()
    assert (oracle_predictions(oracle, out.images) == targets).float().mean() >= 5 / 6


MORPHOMNIST = Path(__file__).resolve().parents[1] / "data" / "morphomnist"


@pytest.fixture(scope="module", params=["diffscm-morphomnist", "diffscm-morphomnist-conditional"])
def morpho_pipe(request) -> DiffSCMPipeline:
    pipe = DiffSCMPipeline.from_pretrained(CHECKPOINTS / request.param)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_morphomnist_pipeline_knows_its_causal_graph(morpho_pipe):
    from diffscm import CausalGraph

    assert morpho_pipe.causal_graph.to_config() == CausalGraph.morphomnist().to_config()
    assert set(morpho_pipe.guidance_scales()) == {"thickness", "intensity", "digit"}
    scales = morpho_pipe.guidance_scales()
    assert scales["digit"] > 0
    if morpho_pipe.mechanism == "classifier-guided":
        assert all(scale > 0 for scale in scales.values()), "guidance is its only way to move a parent"
    assert morpho_pipe.classifier.parents["thickness"]["conditions"] == ["intensity"]
    folder = Path(morpho_pipe.config._name_or_path)
    card = (folder / "README.md").read_text()
    assert card.count("accelerate launch training_scripts/") >= 3 and "thickness -> intensity" in card
    assert "## Evaluation" in card and (folder / "evaluation.md").is_file(), "the card carries a measured report"
    record = json.loads((CHECKPOINTS / "morphomnist-oracle" / "oracle.json").read_text())
    assert record["heldout_accuracy"] >= 0.99
    assert (
        record["split"]["heldout_indices"]
        == json.loads((folder / "training.json").read_text())["split"]["heldout_indices"]
    ), "the oracle and the pipeline hold out the same images"


def test_shipped_morphomnist_interventions_move_the_measured_variables(morpho_pipe):
    from diffscm import morphometrics
    from diffscm.data import load_morphomnist

    indices = json.loads((Path(morpho_pipe.config._name_or_path) / "training.json").read_text())["split"]
    rows = load_morphomnist(str(MORPHOMNIST)).select(indices["heldout_indices"][:4])
    images = [row["image"] for row in rows]
    factual = {name: rows[name] for name in ("thickness", "intensity")} | {"digit": rows["label"]}
    null = morpho_pipe(images, intervention={"digit": rows["label"]}, factual_values=factual, guidance_scale=0.0,
                       output_type="np")  # fmt: skip
    assert abs(null.images[..., 0] * 255 - np.stack([np.asarray(image) for image in images])).mean() < 3
    thin = morpho_pipe(images, intervention={"thickness": 1.5}, factual_values=factual, output_type="np")
    thick = morpho_pipe(images, intervention={"thickness": 5.0}, factual_values=factual, output_type="np")
    assert (thick.counterfactual_values["intensity"] > thin.counterfactual_values["intensity"]).all()
    measured_thin, measured_thick = morphometrics.measure(thin.images), morphometrics.measure(thick.images)
    assert (measured_thick["thickness"] > measured_thin["thickness"]).all()


@pytest.mark.parametrize(
    "name",
    [
        "diffscm-mnist",
        "diffscm-mnist-conditional",
        "diffscm-morphomnist",
        "diffscm-morphomnist-conditional",
        "diffscm-colour-mnist",
    ],
)
def test_every_cards_python_snippet_runs_as_written_on_its_folder(name, tmp_path, monkeypatch):
    card = (CHECKPOINTS / name / "README.md").read_text()
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert f'DiffSCMPipeline.from_pretrained("checkpoints/{name}")' in snippet and "image = " in snippet
    monkeypatch.chdir(CHECKPOINTS.parent)  # the card's path is relative to the repository
    saved = tmp_path / "counterfactual.png"
    exec(snippet.replace('"counterfactual.png"', repr(str(saved))), {})  # noqa: S102
    assert saved.is_file()
    shims = ", ".join(installed_code_shims(CHECKPOINTS / name))
    assert shims and f"trust_remote_code=True)`: its code files ({shims})" in card  # not the line without diffscm


@pytest.mark.parametrize("name", ["diffscm-mnist", "diffscm-morphomnist-conditional", "diffscm-colour-mnist"])
def test_plain_diffusers_loads_a_shipped_folder_through_the_installed_diffscm(name):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(CHECKPOINTS / name, trust_remote_code=True)
    assert type(pipe) is DiffSCMPipeline and type(pipe.classifier).__module__ == "diffscm.models.anticausal"
    assert missing_remote_code(CHECKPOINTS / name) == installed_code_shims(CHECKPOINTS / name)  # an upload stages code


def test_shipped_colour_mnist_recolours_under_do_hue_and_keeps_its_targets_recorded():
    from diffscm.colour_mnist import true_recolouring
    from diffscm.data import heldout_rows, load_image_dataset
    from diffscm.evaluation.protocol import intervention_values

    folder = CHECKPOINTS / "diffscm-colour-mnist"
    pipe = DiffSCMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    rows = heldout_rows(
        str(folder), load_image_dataset(dataset_name=str(CHECKPOINTS.parent / "data" / "colour-mnist")), 6
    )
    factual = pipe.causal_graph.row_values(rows)
    images = (pipe.preprocess([row["image"] for row in rows]) + 1) / 2
    expected = intervention_values(pipe.causal_graph, factual, seed=0)["hue"]
    out = pipe(images, intervention={"hue": expected["hue"]}, factual_values=factual, output_type="pt")
    truth = true_recolouring(images, expected)
    assert (out.images - truth).abs().mean() < (images - truth).abs().mean() / 3
    evaluation = (folder / "evaluation.md").read_text()
    assert (
        "L1 to the true counterfactual" in evaluation and "train_colour_map.py" in (folder / "README.md").read_text()
    )


@pytest.mark.parametrize("folder", sorted(path.parent for path in CHECKPOINTS.glob("*/README.md")))
def test_every_shipped_card_names_its_data_its_task_and_the_library_that_loads_it(folder):
    from huggingface_hub import ModelCard

    data = ModelCard.load(folder / "README.md").data
    assert data.datasets == ["ylecun/mnist"] and data.license and "diffscm" in data.tags
    if data.library_name == "diffusers":  # diffusers alone loads a pipeline folder, not our own judges' classes
        assert (folder / "model_index.json").is_file() and data.pipeline_tag == "image-to-image"
    elif data.library_name == "transformers":
        assert json.loads((folder / "config.json").read_text())["architectures"]
        assert data.pipeline_tag == "image-classification"
    else:
        assert data.library_name == "diffscm" and not (folder / "model_index.json").is_file()


def test_explanations_with_no_scale_take_the_measured_default_at_every_entry_point(tmp_path, capsys):
    """The shipped ViT explained with no scale, in Python and by `diffscm demo --classifier`: both use the
    pipeline's recorded `explained_classifier_scale`, which flips the independent oracle on held-out digits."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from diffscm.cli import main
    from diffscm.data import BUNDLED_MNIST, heldout_rows

    folder, vit_folder = CHECKPOINTS / "diffscm-mnist-conditional", CHECKPOINTS / "mnist-vit-classifier"
    pipe = DiffSCMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    vit = AutoModelForImageClassification.from_pretrained(vit_folder)
    processor = AutoImageProcessor.from_pretrained(vit_folder)
    rows = heldout_rows(str(folder), load_bundled_mnist(), 60, source=BUNDLED_MNIST)
    labels = np.array([row["label"] for row in rows])
    targets = (labels + np.random.default_rng(0).integers(1, 10, len(labels))) % 10  # another digit each
    out = pipe([row["image"] for row in rows], targets, factual_values={"digit": labels}, output_type="pt",
               explained_classifier=vit, explained_processor=processor)  # fmt: skip
    oracle = DigitOracle.from_pretrained(CHECKPOINTS / "mnist-oracle").eval()
    flips = (oracle_predictions(oracle, out.images).numpy() == targets).mean()
    assert flips >= 0.9, f"the oracle agrees with the asked digit on {flips:.3f} of 60 explanations"

    main(["demo", "--classifier", str(vit_folder), "--out", str(tmp_path / "demo"), "--quiet"])
    shown = re.search(r"Oracle agrees with the intervened digit on (\d+)%", capsys.readouterr().out)
    assert int(shown.group(1)) >= 90, shown.group(0)


def test_the_vit_cards_own_way_of_calling_it_reads_grey_digits(heldout):
    """The card's snippet, run as written: the one-channel ViT through its processor, the channel axis given."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    folder = CHECKPOINTS / "mnist-vit-classifier"
    card = (folder / "README.md").read_text()
    assert 'input_data_format="channels_last"' in card and "explained_classifier=classifier" in card
    processor = AutoImageProcessor.from_pretrained(folder)
    classifier = AutoModelForImageClassification.from_pretrained(folder)
    images, labels = heldout
    right = 0
    for image, label in zip(images, labels, strict=True):
        grey_digit = PIL.Image.fromarray((image[0].numpy() * 255).astype(np.uint8))
        inputs = processor(
            images=np.array(grey_digit)[..., None], input_data_format="channels_last", return_tensors="pt"
        )
        right += int(classifier(**inputs).logits.argmax(-1).item() == label)
    assert right >= len(labels) - 1
