"""The exact integrators, BDIA-DDIM (one UNet pass per step each way) and DDIM with abducted residuals (one more
pass per step up): the null intervention returns the input to float error, whatever the spacing, step count or
mechanism; a counterfactual still changes what it should."""

import copy

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from diffscm import DiffSCMPipeline
from diffscm.evaluation.metrics import count_calls
from diffscm.folder_format import unet_passes

FLOAT_ERROR = 1e-4  # [0, 1] scale: 0.026 grey levels


def l1(a, b) -> float:
    return (a - b).abs().mean().item()


@pytest.mark.parametrize("integrator", ["bdia", "residual"])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("mechanism", ["classifier-guided", "conditional"])
def test_the_null_intervention_is_exact_for_every_spacing_step_count_and_mechanism(
    trained_pipeline, conditional_pipeline, factual_images, spacing, mechanism, integrator
):
    images, labels = factual_images
    base = trained_pipeline if mechanism == "classifier-guided" else conditional_pipeline
    scheduler = DDIMScheduler.from_config(base.scheduler.config, timestep_spacing=spacing)
    pipe = DiffSCMPipeline(**(base.components | {"scheduler": scheduler}), causal_graph=base.causal_graph.to_config())
    pipe.set_progress_bar_config(disable=True)
    parents = {name: pipe.causal_graph.nodes[name] for name in pipe.causal_graph.image_parents}
    factual = {
        name: labels if node.type == "categorical" else np.full(len(labels), 0.7) for name, node in parents.items()
    }
    for steps, strength in ((2, 1.0), (7, 1.0), (20, 1.0), (20, 0.5)):
        out = pipe(
            images, intervention=factual, factual_values=factual, num_inference_steps=steps, strength=strength,
            integrator=integrator, output_type="pt", return_reconstruction=True,
        )  # fmt: skip
        assert l1(out.images, images) < FLOAT_ERROR, (steps, strength)
        assert l1(out.reconstructions, images) < FLOAT_ERROR, (steps, strength)


def test_one_pass_per_step_each_way_and_the_abduction_carries_its_state(trained_pipeline, factual_images):
    images, labels = factual_images
    pipe, steps = trained_pipeline, 12
    with count_calls(pipe.unet) as calls:
        abduction = pipe.abduct(images, {"label": labels}, num_inference_steps=steps, integrator="bdia")
    assert calls["samples"] / len(images) == steps, "the first step refined by nothing, then one pass per step"
    assert abduction.integrator == "bdia" and abduction.previous.shape == abduction.noise.shape
    with count_calls(pipe.unet) as calls:
        null = pipe.intervene(abduction)
    assert calls["samples"] / len(images) == steps - 1, "the state after u is carried, not recomputed"
    assert l1(null, images) < FLOAT_ERROR
    repeated = abduction.repeat_interleave(2)
    assert torch.equal(repeated.previous[::2], abduction.previous)


def test_the_residual_integrator_takes_one_more_pass_per_step_up_and_carries_its_residuals(
    trained_pipeline, factual_images
):
    images, labels = factual_images
    pipe, steps = trained_pipeline, 12
    for refinements in (0, 2):
        with count_calls(pipe.unet) as calls:
            abduction = pipe.abduct(
                images, {"label": labels}, num_inference_steps=steps, abduction_refinement_steps=refinements,
                integrator="residual",
            )  # fmt: skip
        assert calls["samples"] / len(images) == steps * (1 + refinements) + (refinements == 0)
        assert abduction.residuals.shape == (len(images), steps, *images.shape[1:]) and abduction.previous is None
        with count_calls(pipe.unet) as down:
            null = pipe.intervene(abduction)
        assert down["samples"] / len(images) == steps
        assert (calls["samples"] + down["samples"]) / len(images) == unet_passes(steps, refinements, "residual")
        assert l1(null, images) < FLOAT_ERROR
    ddim = pipe.abduct(images, {"label": labels}, num_inference_steps=steps, abduction_refinement_steps=0)
    assert l1(pipe.intervene(ddim), images) > 100 * FLOAT_ERROR, "without its residuals the chain does not come back"
    repeated = abduction.repeat_interleave(2)
    assert torch.equal(repeated.residuals[::2], abduction.residuals)
    with pytest.raises(ValueError, match="`residuals` must be a tensor"):
        pipe.intervene(abduction.__class__(**(dict(abduction) | {"residuals": abduction.residuals[:, 1:]})))
    with pytest.raises(ValueError, match="`residuals` contains NaN"):
        pipe.intervene(abduction.__class__(**(dict(abduction) | {"residuals": abduction.residuals * float("nan")})))
    with pytest.raises(ValueError, match="carries residuals, but its integrator is 'ddim'"):
        pipe.intervene(ddim.__class__(**(dict(ddim) | {"residuals": abduction.residuals})))


@pytest.mark.parametrize("integrator", ["bdia", "residual"])
def test_an_exact_integrators_counterfactual_changes_what_it_should(trained_pipeline, factual_images, integrator):
    """do(label = other class) moves the blob as DDIM does (every changed sample's predicted class flips, the
    predictor's probability of the target rises as much), while the samples left unchanged in the same batch come
    back exactly."""
    images, labels = factual_images
    target = labels.clone()
    target[::2] = 1 - labels[::2]
    options = {"guidance_scale": 5, "num_inference_steps": 20, "output_type": "pt"}
    ddim = trained_pipeline(images, target, integrator="ddim", abduction_refinement_steps=1, **options)
    exact = trained_pipeline(images, target, integrator=integrator, **options)
    changed = target != labels
    assert (exact.target_probabilities[changed.numpy()] > 0.5).all()
    assert np.log(exact.target_probabilities).mean() > np.log(ddim.target_probabilities).mean() - 0.2
    assert l1(exact.images[~changed], images[~changed]) < FLOAT_ERROR
    assert l1(exact.images[changed], images[changed]) > 0.05


def test_the_null_intervention_stays_exact_with_bfloat16_weights(trained_pipeline, factual_images):
    """A bfloat16 UNet rounds its input: the integrators' states are kept in float64 so that the two directions feed
    it the same rounded state (in float32 their own rounding differences flipped it and grew)."""
    images, labels = factual_images
    components = trained_pipeline.components | {"unet": copy.deepcopy(trained_pipeline.unet).bfloat16()}
    pipe = DiffSCMPipeline(**components, causal_graph=trained_pipeline.causal_graph.to_config())
    pipe.set_progress_bar_config(disable=True)
    factual = {"label": labels}
    abduction = pipe.abduct(images, factual, num_inference_steps=20, integrator="bdia")
    assert abduction.noise.dtype == torch.float64 and abduction.previous.dtype == torch.float64
    null = pipe.intervene(abduction)
    assert null.dtype == torch.float32
    assert l1(null, images) < 1e-9, "the input's own float32 values come back (float32 states: 3e-8 on this model)"


def test_the_integrator_is_a_saved_setting_chosen_per_call(trained_pipeline, factual_images, tmp_path):
    images, labels = factual_images
    pipe = DiffSCMPipeline(**trained_pipeline.components, integrator="bdia")
    pipe.save_pretrained(tmp_path / "bdia")
    loaded = DiffSCMPipeline.from_pretrained(tmp_path / "bdia")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.integrator == "bdia"
    assert loaded.abduct(images, {"label": labels}, num_inference_steps=4).integrator == "bdia"
    assert loaded.abduct(images, {"label": labels}, num_inference_steps=4, integrator="ddim").previous is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"integrator": "rk4"}, "`integrator` must be one of"),
        ({"integrator": "bdia", "num_inference_steps": 1}, "at least 2 steps"),
        ({"integrator": "bdia", "num_inference_steps": 4, "strength": 0.25}, "at least 2 steps"),
        ({"integrator": "bdia", "eta": 0.5}, "deterministic"),
        ({"integrator": "residual", "eta": 0.5}, "deterministic"),
    ],
)
def test_bad_integrator_requests_are_refused_before_any_work(trained_pipeline, factual_images, kwargs, message):
    images, labels = factual_images
    with count_calls(trained_pipeline.unet) as calls, pytest.raises(ValueError, match=message):
        trained_pipeline(images, labels, **kwargs)
    assert calls["samples"] == 0
    with pytest.raises(ValueError, match="`integrator` must be one of"):
        DiffSCMPipeline(**trained_pipeline.components, integrator="euler")
