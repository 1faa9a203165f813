"""Counterfactual explanations of a clean transformers image classifier: guidance through the DDIM estimate x0_hat."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_pipeline, two_class_images
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from diffscm import ExplainedClassifier
from diffscm.cli import main
from diffscm.evaluation import DigitOracle


def tiny_vit(channels: int = 1, labels: int = 2, size: int = 8) -> ViTForImageClassification:
    config = ViTConfig(image_size=size, patch_size=2, num_channels=channels, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=labels)  # fmt: skip
    return ViTForImageClassification(config)


@pytest.fixture(scope="module")
def vit():
    """A tiny ViT trained for a few seconds on the clean two-class images (no noise: it has never seen x_t)."""
    torch.manual_seed(0)
    model, generator = tiny_vit(), torch.Generator().manual_seed(5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        images, labels = two_class_images(32, generator)
        loss = F.cross_entropy(model(pixel_values=images).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


PROCESSOR = {"size": {"height": 8, "width": 8}, "image_mean": [0.5], "image_std": [0.5]}


@pytest.mark.parametrize("gradient", ["cheap", "full"])
def test_guidance_through_the_denoised_estimate_moves_towards_the_explained_class(
    trained_pipeline, factual_images, vit, gradient
):
    images, labels = factual_images
    explained = ExplainedClassifier(vit, PROCESSOR)
    assert (explained.predict(images * 2 - 1) == labels).float().mean() >= 5 / 6, "the ViT reads the factuals"
    request = dict(factual_values={"label": labels}, num_inference_steps=10, output_type="pt",
                   explained_classifier=vit, explained_processor=PROCESSOR, explained_gradient=gradient)  # fmt: skip
    guided = trained_pipeline(images, 1 - labels, guidance_scale=100.0, **request)
    unguided = trained_pipeline(images, 1 - labels, guidance_scale=0.0, **request)
    assert np.log(guided.target_probabilities).mean() > np.log(unguided.target_probabilities).mean() + 2
    assert (explained.predict(guided.images * 2 - 1) == 1 - labels).float().mean() >= 1 / 2


def test_the_full_gradient_is_not_the_cheap_one(trained_pipeline, factual_images, vit):
    images, labels = factual_images
    request = dict(factual_values={"label": labels}, num_inference_steps=5, output_type="pt", guidance_scale=100.0,
                   explained_classifier=vit, explained_processor=PROCESSOR)  # fmt: skip
    cheap = trained_pipeline(images, 1 - labels, explained_gradient="cheap", **request).images
    full = trained_pipeline(images, 1 - labels, explained_gradient="full", **request).images
    assert (cheap - full).abs().max() > 1e-3, "explained_gradient='full' differentiates through the UNet"


def test_the_processor_resizes_and_normalises_differentiably_for_an_rgb_classifier():
    explained = ExplainedClassifier(tiny_vit(channels=3, size=16), {"size": {"height": 16, "width": 16},
                                    "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2]})  # fmt: skip
    sample = torch.zeros(2, 1, 8, 8, requires_grad=True)  # grey mid-level in [-1, 1]
    pixels = explained.pixel_values(sample)
    assert pixels.shape == (2, 3, 16, 16)
    torch.testing.assert_close(pixels[0, :, 0, 0], torch.tensor([0.0, 0.5, 1.0]))  # (0.5 - mean) / std
    explained.log_prob(sample, torch.tensor([0, 1])).sum().backward()
    assert sample.grad is not None and sample.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "classifier, message",
    [
        ("google/vit-base", "image classification model"),
        (torch.nn.Linear(4, 2), "image classification model"),
    ],
)
def test_wrong_classifier_types_are_refused(trained_pipeline, classifier, message):
    with pytest.raises(TypeError, match=message):
        trained_pipeline(torch.rand(1, 1, 8, 8), 1, explained_classifier=classifier, num_inference_steps=2)


def test_the_old_keywords_still_explain_with_a_deprecation_warning(trained_pipeline, factual_images, vit):
    images, labels = factual_images
    request = dict(factual_values={"label": labels}, num_inference_steps=4, guidance_scale=8.0, output_type="pt")
    new = trained_pipeline(images, 1 - labels, explained_classifier=vit, explained_processor=PROCESSOR, **request)
    with pytest.warns(FutureWarning, match="`classifier` is now `explained_classifier`"):
        old = trained_pipeline(images, 1 - labels, classifier=vit, classifier_processor=PROCESSOR, **request)
    torch.testing.assert_close(old.images, new.images)
    with pytest.raises(TypeError, match="Unexpected keyword argument"):
        trained_pipeline(images, 1 - labels, classifer=vit, **request)


def test_targets_outside_the_classifiers_labels_and_bad_gradients_are_refused(vit):
    pipe = tiny_pipeline(num_classes=3, num_inference_steps=2)
    with pytest.raises(ValueError, match="not a class of the explained classifier, which has 2 labels"):
        pipe(torch.rand(1, 1, 8, 8), 2, factual_values={"label": 0}, explained_classifier=vit,
             explained_processor=PROCESSOR)  # fmt: skip
    with pytest.raises(ValueError, match="`explained_gradient` must be 'cheap' or 'full'"):
        pipe(torch.rand(1, 1, 8, 8), 1, explained_classifier=vit, explained_gradient="exact")


@pytest.mark.slow
def test_the_training_script_ships_a_classifier_that_evaluate_explains(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    export = tmp_path / "vit"
    command = [sys.executable, str(root / "training_scripts" / "train_image_classifier.py"), "--output_dir",
               str(tmp_path / "run"), "--export_dir", str(export), "--max_train_steps", "2", "--hidden_size", "16",
               "--num_hidden_layers", "1", "--num_attention_heads", "2", "--report_to", "none"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert AutoModelForImageClassification.from_pretrained(export).config.num_labels == 10
    assert AutoImageProcessor.from_pretrained(export).size == {"height": 28, "width": 28}
    card = (export / "README.md").read_text()
    assert "train_image_classifier.py" in card and "Held-out accuracy" in card

    pipeline = tmp_path / "pipeline"
    tiny_pipeline(size=28, num_classes=10, num_inference_steps=2, guidance_scale=1.0).save_pretrained(pipeline)
    (pipeline / "training.json").write_text(
        json.dumps({"split": {"source": "mnist-bundled", "heldout_indices": [3, 10]}})
    )
    oracle = tmp_path / "oracle"
    DigitOracle(channels=(4, 8)).save_pretrained(oracle)
    main(["evaluate", "--model", str(pipeline), "--oracle", str(oracle), "--classifier", str(export), "--num-samples",
          "2", "--out", str(tmp_path / "eval"), "--quiet"])  # fmt: skip
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    cheap, full = result["explained, cheap gradient"], result["explained, full gradient"]
    assert cheap["nfe_per_counterfactual"] == full["nfe_per_counterfactual"] == 4  # 2 steps each way, no refinement
    assert cheap["classifier_passes_per_counterfactual"] == 2 * 4  # 2 steps, 4 random views each
    assert "flip rate, independent oracle" in (tmp_path / "eval" / "report.md").read_text()
    with pytest.raises(SystemExit, match="not a transformers image classifier"):
        main(["evaluate", "--model", str(pipeline), "--oracle", str(oracle), "--classifier", str(oracle),
              "--num-samples", "2", "--out", str(tmp_path / "eval2"), "--quiet"])  # fmt: skip

    monkeypatch.chdir(tmp_path)  # the default --out: a folder per model and setting, beside the model's own demo
    main(["demo", "--model", str(pipeline), "--oracle", str(oracle), "--classifier", str(export), "--num-digits", "2",
          "--quiet"])  # fmt: skip
    tables = (tmp_path / "diffscm-demo" / f"{pipeline.name}-explains-{export.name}" / "oracle.md").read_text()
    assert "Predictions of the explained classifier" in tables and tables.count("\n| ") == 2 * (1 + 2)  # 2 rows each
    with pytest.raises(SystemExit, match="not a transformers image classifier"):
        main(["demo", "--model", str(pipeline), "--oracle", str(oracle), "--classifier", str(oracle),
              "--out", str(tmp_path / "demo2"), "--quiet"])  # fmt: skip


def test_a_saved_classifier_without_its_processor_is_fed_as_its_own_processor_says():
    from diffscm import DiffSCMPipeline
    from diffscm.paths import shipped_checkpoint

    folder = shipped_checkpoint("mnist-vit-classifier")
    model = AutoModelForImageClassification.from_pretrained(folder)
    pipe = DiffSCMPipeline.from_pretrained(shipped_checkpoint("diffscm-mnist"))
    guessed, _ = pipe.explained_from({}, model, None, "cheap")
    given, _ = pipe.explained_from({}, model, AutoImageProcessor.from_pretrained(folder), "cheap")
    assert guessed.size == given.size and torch.equal(guessed.mean, given.mean) and torch.equal(guessed.std, given.std)
    raw, _ = pipe.explained_from({}, ViTForImageClassification(ViTConfig(image_size=28, num_labels=10)), None, "cheap")
    assert raw.size != given.size, "a classifier without a saved processor takes the images as they are"
