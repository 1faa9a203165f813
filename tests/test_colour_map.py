"""A colour map: parents that act on the image only through its colours, x = A(c) y per pixel, so that an
intervention on them recolours the image and leaves the rest (conftest's tiny SCM, where brightness sets the blob's
grey level)."""

import csv
import json

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_GRAPH, launch, two_class_images
from test_hub import run_python

from diffscm import DiffSCMPipeline, ParentColourMap

BRIGHTNESS = {"brightness": {"type": "continuous", "range": [0.5, 1.0]}}


def random_map(parents=None, reference=None, channels=1, seed=0) -> ParentColourMap:
    """A map with its (zero-initialised) output layer drawn at random, so that it is not the identity."""
    torch.manual_seed(seed)
    colour_map = ParentColourMap(parents or BRIGHTNESS, reference or {"brightness": 0.75}, num_channels=channels)
    torch.nn.init.normal_(colour_map.net[-1].weight, std=0.2)
    return colour_map.eval().requires_grad_(False)


def with_map(pipe: DiffSCMPipeline, colour_map, **config) -> DiffSCMPipeline:
    settings = {name: pipe.config[name] for name in ("guidance_scale", "num_inference_steps")} | config
    mapped = DiffSCMPipeline(**(pipe.components | {"colour_map": colour_map}), causal_graph=TINY_GRAPH, **settings)
    mapped.set_progress_bar_config(disable=True)
    return mapped


def test_the_map_is_the_identity_at_the_reference_keeps_black_and_maps_each_colour_the_same_way_anywhere():
    parents = {"hue": {"type": "continuous", "range": [0.0, 1.0]}, "stain": {"type": "categorical", "num_classes": 3}}
    colour_map = ParentColourMap(parents, {"hue": 0.5, "stain": 0}, num_channels=3)
    x = torch.rand(4, 3, 5, 5)
    values = {"hue": torch.rand(4), "stain": torch.tensor([0, 1, 2, 1])}
    torch.testing.assert_close(colour_map(x, values), x)
    colour_map = random_map(parents, {"hue": 0.5, "stain": 0}, channels=3)
    y = colour_map.to_reference(x, values)
    assert (y - x).abs().max() > 0.05
    torch.testing.assert_close(colour_map(y, values), x)
    at_reference = {"hue": torch.full((4,), 0.5), "stain": torch.zeros(4, dtype=torch.long)}
    torch.testing.assert_close(colour_map.to_reference(x, at_reference), x)
    black = torch.full((4, 3, 2, 2), -1.0)
    torch.testing.assert_close(colour_map(black, values), black)
    x[:, :, 1, 2] = x[:, :, 3, 4]  # the same colour in two places: the same colour at the reference
    torch.testing.assert_close(
        colour_map.to_reference(x, values)[:, :, 1, 2], colour_map.to_reference(x, values)[:, :, 3, 4]
    )


@pytest.mark.parametrize(
    "parents, reference, match",
    [
        (BRIGHTNESS, {}, "must give a value for each colour parent"),
        (BRIGHTNESS, {"brightness": 2.0}, "reference value of 'brightness', 2.0, is outside"),
        ({"stain": {"type": "categorical", "num_classes": 3}}, {"stain": 3}, "reference value of 'stain'"),
        ({"hue": {"type": "continuous", "range": [1, 0]}}, {"hue": 0.5}, "Parent 'hue'"),
    ],
)
def test_a_bad_colour_map_is_refused_naming_the_parent(parents, reference, match):
    with pytest.raises(ValueError, match=match):
        ParentColourMap(parents, reference)


def test_do_a_colour_parent_recolours_and_leaves_the_diffusion_alone(conditional_pipeline, factual_images):
    images, labels = factual_images
    colour_map = random_map()
    pipe = with_map(conditional_pipeline, colour_map, integrator="residual", num_inference_steps=4)
    factual = {"position": labels, "brightness": torch.full((6,), 0.6)}
    null = pipe(images, intervention=factual, factual_values=factual, output_type="pt")
    torch.testing.assert_close(null.images, images, atol=1e-5, rtol=0)
    brighter = pipe(images, intervention={"brightness": 0.95}, factual_values=factual, output_type="pt").images
    recoloured = colour_map(colour_map.to_reference(images * 2 - 1, factual), {"brightness": 0.95})
    torch.testing.assert_close(brighter, ((recoloured + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
    plain = conditional_pipeline(images, intervention={"brightness": 0.95}, factual_values=factual, output_type="pt")
    assert (plain.images - brighter).abs().max() > 0.05, "without the map the diffusion redraws the image"


def test_the_mechanism_draws_at_the_reference_colour_then_maps(conditional_pipeline):
    colour_map = random_map()
    pipe = with_map(conditional_pipeline, colour_map)
    position = torch.tensor([0, 1, 1])
    generator = torch.Generator().manual_seed
    drawn = pipe.generate({"position": position, "brightness": 0.9}, generator=generator(0), output_type="latent")
    values = {"position": position, "brightness": 0.75}
    reference = conditional_pipeline.generate(values, generator=generator(0), output_type="latent")
    torch.testing.assert_close(drawn, colour_map(reference.clamp(-1, 1), {"brightness": torch.full((3,), 0.9)}))


def test_a_pipeline_with_a_colour_map_saves_and_loads_whole(conditional_pipeline, factual_images, tmp_path):
    images, labels = factual_images
    pipe = with_map(conditional_pipeline, random_map(), num_inference_steps=3)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = DiffSCMPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.colour_map.config.reference == {"brightness": 0.75}
    request = {"intervention": {"brightness": 0.9}, "factual_values": {"position": labels, "brightness": 0.6}}
    torch.testing.assert_close(
        loaded(images, output_type="pt", **request).images, pipe(images, output_type="pt", **request).images
    )
    assert "colour_map" in (tmp_path / "pipe" / "README.md").read_text()


def test_plain_diffusers_loads_a_colour_map_from_the_folders_own_code(conditional_pipeline, tmp_path):
    with_map(conditional_pipeline, random_map(), num_inference_steps=2).save_pretrained(tmp_path / "pipe")
    out = run_python(
        f"""
        import sys, torch
        sys.modules["diffscm"] = None  # diffscm is not installed for this user
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained("{tmp_path / "pipe"}", trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        values = {{"position": [0, 1], "brightness": [0.6, 0.7]}}
        out = pipe(torch.rand(2, 1, 8, 8), intervention={{"brightness": 0.9}}, factual_values=values, output_type="pt")
        print(type(pipe.colour_map).__name__, tuple(out.images.shape))
        """
    )
    assert "ParentColourMap (2, 1, 8, 8)" in out


def test_a_colour_map_that_does_not_fit_the_pipeline_is_refused(conditional_pipeline, scm_pipeline):
    with pytest.raises(ValueError, match="needs a `parent_embedding`"):
        DiffSCMPipeline(**(scm_pipeline.components | {"colour_map": random_map()}), causal_graph=TINY_GRAPH)
    with pytest.raises(ValueError, match="maps 3 channels; the UNet takes 1"):
        with_map(conditional_pipeline, random_map(channels=3))
    level = {"level": {"type": "continuous", "range": [-3.0, 3.0]}}
    with pytest.raises(ValueError, match="colour map's parent 'level'"):
        with_map(conditional_pipeline, random_map(level, {"level": 0.0}))


def write_blobs(folder, count: int, seed: int):
    """The tiny SCM's blobs as a standard imagefolder with `metadata.csv` (level, brightness, position)."""
    images, labels, brightness = two_class_images(count, torch.Generator().manual_seed(seed), with_brightness=True)
    folder.mkdir()
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "level", "brightness", "position"])
        for i in range(count):
            pixels = ((images[i, 0] + 1) * 127.5).round().numpy().astype(np.uint8)
            PIL.Image.fromarray(pixels).save(folder / f"{i:03d}.png")
            writer.writerow([f"{i:03d}.png", 0.0, round(float(brightness[i]), 4), int(labels[i])])
    return images, labels, brightness


@pytest.mark.slow
def test_train_colour_map_fits_a_map_that_the_unet_at_the_reference_reads_better(conditional_pipeline, tmp_path):
    conditional_pipeline.save_pretrained(tmp_path / "conditional")
    write_blobs(tmp_path / "blobs", 320, seed=5)
    common = ["--pipeline", str(tmp_path / "conditional"), "--dataset_name", str(tmp_path / "blobs")]
    run = [*common, "--colour_parents", "brightness", "--output_dir", str(tmp_path / "run"), "--report_to", "none"]
    missing = [*run, "--reference", "brightness=0.7", "--pipeline", str(tmp_path / "nothing")]
    refused = launch("train_colour_map.py", *missing, check=False)
    assert refused.returncode != 0 and "is not a pipeline folder (it has no model_index.json)" in refused.stderr
    refused = launch("train_colour_map.py", *run, "--reference", "brightness=0.2", check=False)
    assert refused.returncode != 0 and "reference value of 'brightness', 0.2, is outside" in refused.stderr
    refused = launch("train_colour_map.py", *run, "--reference", "level=0", check=False)
    assert (
        refused.returncode != 0 and "--reference must give NAME=VALUE for each of --colour_parents" in refused.stderr
    )
    launch(
        "train_colour_map.py", *run, "--reference", "brightness=0.75", "--max_train_steps", "150",
        "--train_batch_size", "32", "--learning_rate", "3e-3", "--pipeline_output_dir", str(tmp_path / "mapped"),
    )  # fmt: skip
    losses = json.loads((tmp_path / "run" / "heldout_metrics.json").read_text())
    assert losses["mapped"] < losses["reference"], losses
    record = json.loads((tmp_path / "mapped" / "training.json").read_text())
    assert "train_colour_map.py" in record["commands"][-1] and record["colour_map_metrics"] == losses
    pipe = DiffSCMPipeline.from_pretrained(tmp_path / "mapped")
    colour_map = pipe.colour_map
    assert colour_map.config.reference == {"brightness": 0.75}
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    at = {"brightness": torch.tensor([0.75, 0.75])}
    torch.testing.assert_close(colour_map.to_reference(images, at), images)  # the identity at the reference
    assert (colour_map.to_reference(images, {"brightness": torch.tensor([0.5, 1.0])}) - images).abs().max() > 1e-3
