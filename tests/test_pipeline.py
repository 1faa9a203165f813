from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_classifier, tiny_pipeline
from diffusers import DDIMScheduler, DDPMScheduler

from diffscm import DiffSCMPipeline


def l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().mean().item()


def test_null_intervention_reconstructs_and_improves_with_steps(trained_pipeline, factual_images):
    images, labels = factual_images
    errors = {}
    for steps in (5, 20, 50):
        out = trained_pipeline(images, labels, guidance_scale=0, num_inference_steps=steps, output_type="pt")
        errors[steps] = l1(out.images, images)
    assert errors[50] < errors[20] < errors[5]
    assert errors[50] < 0.01  # on the [0, 1] scale: under 2.6 grey levels


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_abduction_and_prediction_walk_one_chain_for_every_timestep_spacing(trained_pipeline, factual_images, spacing):
    """Each generation step lands on the alpha-bar of the next listed timestep, so the inversion (the same steps
    backwards) is undone by the prediction whatever the scheduler's spacing: the null intervention returns the
    input (the generation step used to recompute its target as t - T // n, right for `leading` only)."""
    images, labels = factual_images
    scheduler = DDIMScheduler.from_config(trained_pipeline.scheduler.config, timestep_spacing=spacing)
    pipe = DiffSCMPipeline(trained_pipeline.unet, scheduler, trained_pipeline.classifier)
    pipe.set_progress_bar_config(disable=True)
    for steps in (7, 30):
        chain = pipe.get_chain(steps)
        assert [t for t, _, _ in chain] == pipe.scheduler.timesteps.tolist()
        assert all(chain[i][2] == chain[i + 1][1] for i in range(len(chain) - 1))
        assert chain[-1][2] == float(pipe.scheduler.final_alpha_cumprod)
    errors = {}
    for steps in (10, 30):
        out = pipe(images, labels, guidance_scale=0, num_inference_steps=steps, output_type="pt")
        errors[steps] = l1(out.images, images)
    assert errors[30] < errors[10] and errors[30] < 0.02, errors  # [0, 1] scale: under 5 grey levels


def test_exact_abduction_refinement_reduces_reconstruction_error(trained_pipeline, factual_images):
    images, labels = factual_images
    plain = trained_pipeline(images, labels, guidance_scale=0, num_inference_steps=10, output_type="pt")
    refined = trained_pipeline(
        images, labels, guidance_scale=0, num_inference_steps=10, abduction_refinement_steps=3, output_type="pt"
    )
    assert l1(refined.images, images) < 0.6 * l1(plain.images, images)


def test_anderson_acceleration_beats_plain_fixed_point_iteration(trained_pipeline, factual_images, monkeypatch):
    images, labels = factual_images
    errors = {}
    for name in ("anderson", "plain"):
        if name == "plain":
            monkeypatch.setattr(type(trained_pipeline).__module__ + ".anderson_mix", lambda tried, mapped: mapped[-1])
        out = trained_pipeline(
            images, labels, guidance_scale=0, num_inference_steps=30, abduction_refinement_steps=3, output_type="pt"
        )
        errors[name] = l1(out.images, images)
    assert errors["anderson"] < 0.8 * errors["plain"], errors


def test_guidance_raises_log_likelihood_of_the_target(trained_pipeline, factual_images):
    images, labels = factual_images
    target = 1 - labels
    null = trained_pipeline(images, target, guidance_scale=0, num_inference_steps=20, output_type="pt")
    guided = trained_pipeline(images, target, guidance_scale=5, num_inference_steps=20, output_type="pt")
    assert np.log(guided.target_probabilities).mean() > np.log(null.target_probabilities).mean() + 1
    assert (guided.target_probabilities > 0.5).mean() >= 0.5
    assert not torch.allclose(guided.images, null.images)


def test_one_abduction_serves_every_target(trained_pipeline, factual_images):
    images, _ = factual_images
    everything = trained_pipeline(images[:2], "all", num_inference_steps=8, guidance_scale=3, output_type="pt")
    assert everything.images.shape == (4, 1, 8, 8)
    assert everything.targets.tolist() == [0, 1, 0, 1]
    one = trained_pipeline(images[1:2], 1, num_inference_steps=8, guidance_scale=3, output_type="pt")
    torch.testing.assert_close(everything.images[3], one.images[0], atol=1e-5, rtol=0)
    as_array = trained_pipeline(images[:2], [[1], [0]], num_inference_steps=8, guidance_scale=3, output_type="pt")
    torch.testing.assert_close(as_array.images, everything.images[[1, 2]], atol=1e-5, rtol=0)


def test_batch_matches_single_images(trained_pipeline, factual_images):
    images, labels = factual_images
    batch = trained_pipeline(images[:3], [1, 0, 1], num_inference_steps=6, guidance_scale=2, output_type="pt")
    for i, target in enumerate([1, 0, 1]):
        single = trained_pipeline(images[i], target, num_inference_steps=6, guidance_scale=2, output_type="pt")
        torch.testing.assert_close(batch.images[i], single.images[0], atol=1e-4, rtol=0)  # BLAS batch paths


def test_abduct_then_intervene_equals_call(trained_pipeline, factual_images):
    images, _ = factual_images
    abduction = trained_pipeline.abduct(images, num_inference_steps=6, strength=0.5)
    assert (
        abduction.noise.dtype == trained_pipeline.state_dtype == torch.float64
        and abduction.noise.shape == images.shape
    )
    assert (abduction.num_inference_steps, abduction.strength, abduction.abduction_refinement_steps) == (6, 0.5, 0)
    manual = trained_pipeline.intervene(abduction, 1, guidance_scale=2)  # follows the abduction's chain
    called = trained_pipeline(images, 1, guidance_scale=2, num_inference_steps=6, strength=0.5, output_type="pt")
    torch.testing.assert_close(manual, called.images)


def test_stochastic_intervention_is_reproducible_with_a_generator(trained_pipeline, factual_images):
    images, labels = factual_images

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return trained_pipeline(images, labels, num_inference_steps=5, eta=1.0, generator=generator, output_type="pt")

    assert torch.equal(run(0).images, run(0).images)
    assert not torch.allclose(run(0).images, run(1).images)


def test_deterministic_without_eta(trained_pipeline, factual_images):
    images, labels = factual_images
    first = trained_pipeline(images, labels, num_inference_steps=5, output_type="pt")
    second = trained_pipeline(images, labels, num_inference_steps=5, output_type="pt")
    assert torch.equal(first.images, second.images)


def test_output_types_and_diagnostics(trained_pipeline, factual_images):
    images, labels = factual_images
    kwargs = dict(num_inference_steps=3, return_reconstruction=True, return_noise=True)
    pil = trained_pipeline(images, labels, **kwargs)
    assert len(pil.images) == 6 and all(isinstance(im, PIL.Image.Image) and im.mode == "L" for im in pil.images)
    assert pil.images[0].size == (8, 8) and len(pil.reconstructions) == 6
    array = trained_pipeline(images, labels, output_type="np", **kwargs)
    assert array.images.shape == (6, 8, 8, 1) and 0 <= array.images.min() and array.images.max() <= 1
    tensor = trained_pipeline(images, labels, output_type="pt", **kwargs)
    assert tensor.images.shape == (6, 1, 8, 8) and tensor.noise.shape == (6, 1, 8, 8)
    assert (
        tensor.target_probabilities.shape == (6,)
        and ((0 <= tensor.target_probabilities) & (tensor.target_probabilities <= 1)).all()
    )
    np.testing.assert_allclose(np.asarray(pil.images[0]) / 255, array.images[0, ..., 0], atol=1 / 255)
    null = trained_pipeline(images, labels, guidance_scale=0, num_inference_steps=3, output_type="pt")
    torch.testing.assert_close(tensor.reconstructions, null.images)
    as_tuple = trained_pipeline(images, labels, num_inference_steps=3, output_type="pt", return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 9 and torch.equal(as_tuple[0], tensor.images)
    assert as_tuple[7] is None and as_tuple[8] is None, "the tuple keeps its layout: no reconstructions, no noise"
    np.testing.assert_array_equal(tensor["target_probabilities"], tensor.target_probabilities)  # a field like others
    plain = trained_pipeline(images, labels, num_inference_steps=3, output_type="pt")
    assert len(plain.to_tuple()) == 7 and as_tuple[6] is not None, "diffusers' to_tuple keeps the probabilities"


def test_latent_output_is_the_raw_sample_on_every_entry_point(trained_pipeline, factual_images):
    images, labels = factual_images
    options = dict(guidance_scale=0, num_inference_steps=5)
    latent = trained_pipeline(images, labels, output_type="latent", **options).images
    pt = trained_pipeline(images, labels, output_type="pt", **options).images
    torch.testing.assert_close(((latent + 1) / 2).clamp(0, 1), pt)
    abduction = trained_pipeline.abduct(images, {"label": labels}, num_inference_steps=5)
    torch.testing.assert_close(
        trained_pipeline.intervene(abduction, labels, guidance_scale=0, output_type="latent"), latent
    )


def test_interrupt_stops_the_prediction_and_num_timesteps_counts_it(trained_pipeline, factual_images):
    images, labels = factual_images
    seen = []

    def stop_after_two(pipe, step, timestep, callback_kwargs):
        seen.append(step)
        pipe._interrupt = step == 1
        return callback_kwargs

    abduction = trained_pipeline.abduct(images, {"label": labels}, num_inference_steps=6)
    trained_pipeline.intervene(abduction, callback_on_step_end=stop_after_two)
    assert seen == [0, 1] and trained_pipeline.num_timesteps == 6
    trained_pipeline.intervene(abduction, callback_on_step_end=lambda *args: {})
    assert not trained_pipeline.interrupt, "each prediction starts uninterrupted"


def test_callback_sees_and_can_replace_every_step(trained_pipeline, factual_images):
    images, labels = factual_images
    seen = []

    def callback(pipe, step, timestep, kwargs):
        seen.append((step, timestep))
        return {"sample": torch.zeros_like(kwargs["sample"])}

    out = trained_pipeline(images, labels, num_inference_steps=4, callback_on_step_end=callback, output_type="pt")
    assert [step for step, _ in seen] == [0, 1, 2, 3]
    assert [t for _, t in seen] == sorted((t for _, t in seen), reverse=True)
    assert torch.allclose(out.images, torch.full_like(out.images, 0.5))


def test_save_load_round_trip_keeps_outputs_and_defaults(tmp_path, factual_images):
    pipe = tiny_pipeline(guidance_scale=2.5, num_inference_steps=4, abduction_refinement_steps=1)
    pipe.save_pretrained(tmp_path)
    loaded = DiffSCMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.guidance_scale == 2.5 and loaded.config.num_inference_steps == 4
    assert loaded.config.abduction_refinement_steps == 1
    images, labels = factual_images
    assert torch.equal(pipe(images, labels, output_type="pt").images, loaded(images, labels, output_type="pt").images)


def test_rgb_16x16_model_takes_grey_and_rgb_input():
    pipe = tiny_pipeline(channels=3, size=16, num_classes=3)
    rgb = PIL.Image.new("RGB", (16, 16), (200, 30, 90))
    out = pipe([rgb, PIL.Image.new("L", (16, 16), 128)], target=[2, 0], num_inference_steps=3, output_type="np")
    assert out.images.shape == (2, 16, 16, 3) and np.isfinite(out.images).all()


def test_low_precision_unet_keeps_the_abduction_in_full_precision(factual_images):
    pipe = tiny_pipeline()
    pipe.unet.to(torch.bfloat16)
    noise = pipe.abduct(factual_images[0], num_inference_steps=3).noise
    assert noise.dtype == pipe.state_dtype == torch.float64 and torch.isfinite(noise).all()


def test_a_ddpm_scheduler_is_read_as_ddim():
    pipe = tiny_pipeline()
    pipe = DiffSCMPipeline(pipe.unet, DDPMScheduler(), pipe.classifier)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"target": 2}, ValueError, r"class indices in \[0, 1\]"),
        ({"target": -1}, ValueError, "class indices"),
        ({"target": [0, 1]}, ValueError, "one per image"),
        ({"target": 0.5}, TypeError, "integer class indices"),
        ({"target": "three"}, ValueError, "'all'"),
        ({"target": 0, "guidance_scale": -1.0}, ValueError, "guidance_scale"),
        ({"target": 0, "guidance_scale": float("nan")}, ValueError, "guidance_scale"),
        ({"target": 0, "num_inference_steps": 0}, ValueError, "num_inference_steps"),
        ({"target": 0, "num_inference_steps": 2000}, ValueError, "num_inference_steps"),
        ({"target": 0, "strength": 0.0}, ValueError, "strength"),
        ({"target": 0, "abduction_refinement_steps": -1}, ValueError, "abduction_refinement_steps"),
        ({"target": 0, "eta": 2.0}, ValueError, "eta"),
        ({"target": 0, "output_type": "tensor"}, ValueError, "output_type"),
        ({"target": 0, "callback_on_step_end_tensor_inputs": ["latents"]}, ValueError, "tensor_inputs"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error, message):
    pipe = tiny_pipeline()
    with pytest.raises(error, match=message):
        pipe(torch.rand(3, 1, 8, 8), num_inference_steps=kwargs.pop("num_inference_steps", 2), **kwargs)


@pytest.mark.parametrize(
    "image, message",
    [
        (torch.full((1, 1, 8, 8), float("nan")), "NaN"),
        (torch.rand(1, 2, 8, 8), "2 channels"),
    ],
)
def test_bad_images_are_rejected(image, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipeline()(image, target=0, num_inference_steps=2)


def test_bad_abductions_are_rejected():
    pipe = tiny_pipeline()
    abduction = pipe.abduct(torch.rand(2, 1, 8, 8), num_inference_steps=2)
    with pytest.raises(TypeError, match="Abduction returned by `abduct`"):
        pipe.intervene(torch.randn(2, 1, 8, 8), 0)
    with pytest.raises(ValueError, match="from `abduct`"):
        pipe.intervene(replace(abduction, noise=torch.randn(2, 1, 4, 4)), 0)
    with pytest.raises(ValueError, match="NaN"):
        pipe.intervene(replace(abduction, noise=torch.full((2, 1, 8, 8), float("nan"))), 0)
    with pytest.raises(ValueError, match="one target per sample"):
        pipe.intervene(abduction, "all")
    with pytest.raises(ValueError, match="output_type"):
        pipe.intervene(abduction, 0, output_type="jpg")
    assert pipe.intervene(abduction.repeat_interleave(3), [0, 1, 0, 1, 0, 1]).shape == (6, 1, 8, 8)


def test_mismatched_components_are_rejected():
    small, large = tiny_pipeline(size=8), tiny_pipeline(size=16)
    with pytest.raises(ValueError, match="sample_size"):
        DiffSCMPipeline(small.unet, small.scheduler, large.classifier)


# --- causal graphs with several parents (the tiny SCM of conftest.TINY_GRAPH) ---


def blob_brightness(images: torch.Tensor) -> torch.Tensor:
    """Mean of the 9 brightest pixels of each image in [0, 1]: the blob's brightness."""
    return images.flatten(1).topk(9, dim=1).values.mean(dim=1)


def test_scm_null_intervention_reconstructs(scm_pipeline, factual_images):
    images, labels = factual_images
    out = scm_pipeline(
        images, intervention={"position": labels}, guidance_scale=0.0, output_type="pt", return_reconstruction=True
    )
    assert (out.images - images).abs().mean() < 0.03
    assert (out.reconstructions - images).abs().mean() < 0.03


def test_scm_intervention_on_a_continuous_parent_moves_it_the_right_way(scm_pipeline, factual_images):
    images, labels = factual_images
    factual = {"position": labels}
    bright = scm_pipeline(images, intervention={"brightness": 1.0}, factual_values=factual, output_type="pt")
    dim = scm_pipeline(images, intervention={"brightness": 0.5}, factual_values=factual, output_type="pt")
    assert (blob_brightness(bright.images) > blob_brightness(dim.images)).float().mean() >= 5 / 6
    assert bright.predicted_factuals == ["brightness"], "brightness was not given, so it was predicted"
    assert bright.predicted_values["brightness"].mean() > dim.predicted_values["brightness"].mean()
    np.testing.assert_array_equal(bright.counterfactual_values["position"], labels.numpy())


def test_scm_do_on_an_ancestor_propagates_through_the_mechanism(scm_pipeline, factual_images):
    images, labels = factual_images
    factual = {"level": 0.0, "brightness": 0.75, "position": labels}
    out = scm_pipeline(images, intervention={"level": 2.0}, factual_values=factual, output_type="np")
    expected = 0.5 + 0.5 / (1 + np.exp(-(2.0 + 0.5 * 0.0)))  # the abducted noise of brightness is 0 here
    np.testing.assert_allclose(out.counterfactual_values["brightness"], expected, rtol=1e-6)
    assert out.predicted_factuals == [] and out.images.shape == (6, 8, 8, 1)
    with pytest.raises(ValueError, match=r"factual values of \['level'\] are needed"):
        scm_pipeline(images, intervention={"level": 2.0}, factual_values={"position": labels})


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"target": 1}, ValueError, "use `intervention="),
        ({"target": 1, "intervention": {"position": 1}}, ValueError, "either `target` or `intervention`"),
        ({}, ValueError, "either `target` or `intervention`"),
        ({"intervention": {}}, ValueError, "non-empty dict"),
        ({"intervention": {"colour": 1}}, ValueError, "Unknown variable 'colour'"),
        ({"intervention": {"brightness": 2.0}}, ValueError, "range"),
        ({"intervention": {"position": 0.5}}, ValueError, "class indices"),
        ({"intervention": {"brightness": "high"}}, TypeError, "numbers"),
        ({"intervention": {"position": [0, 1, 0]}}, ValueError, "3 values for 6 images"),
        ({"intervention": {"position": 1}, "factual_values": [0.7]}, ValueError, "must be a dict"),
        ({"intervention": {"position": 1}, "guidance_scale": {"level": 1.0}}, ValueError, "not parents of the image"),
        ({"intervention": {"position": 1}, "guidance_scale": {"position": -1.0}}, ValueError, "guidance_scale"),
    ],
)
def test_scm_bad_requests_are_refused(scm_pipeline, factual_images, kwargs, error, message):
    with pytest.raises(error, match=message):
        scm_pipeline(factual_images[0], num_inference_steps=2, **kwargs)


def test_scm_intervene_needs_every_parent(scm_pipeline):
    abduction = scm_pipeline.abduct(torch.rand(2, 1, 8, 8), num_inference_steps=2)
    assert set(abduction.factual_values) == {"brightness", "position"}, "parents not given were predicted"
    with pytest.raises(ValueError, match="all the image's parents"):
        scm_pipeline.intervene(abduction, {"position": 1})
    assert scm_pipeline.intervene(abduction, None).shape == (2, 1, 8, 8)  # the null intervention


def test_scm_do_parents_equal_to_the_factual_ones_is_the_reconstruction(scm_pipeline, factual_images):
    images, labels = factual_images
    factual = {"position": labels, "brightness": 0.8}
    out = scm_pipeline(
        images, intervention=factual, factual_values=factual, output_type="pt", return_reconstruction=True
    )
    assert scm_pipeline.guidance_scales()["brightness"] > 0, "guidance is on, but nothing changes, so none acts"
    torch.testing.assert_close(out.images, out.reconstructions)


def test_scm_guidance_holds_the_unchanged_parents_of_an_intervened_sample(scm_pipeline, factual_images):
    images, labels = factual_images
    factual = {"position": labels, "brightness": torch.full((len(labels),), 0.8)}
    abduction = scm_pipeline.abduct(images, factual, num_inference_steps=4)
    moved = labels.clone()
    moved[0] = 1 - labels[0]  # only the first sample's position is intervened on
    target = {"position": moved, "brightness": factual["brightness"]}
    held = scm_pipeline.intervene(abduction, target, guidance_scale={"brightness": 5.0})
    free = scm_pipeline.intervene(abduction, target, guidance_scale={"brightness": 0.0})
    assert (held[0] - free[0]).abs().max() > 1e-3, "the unchanged brightness is guided towards its factual value"
    torch.testing.assert_close(held[1:], scm_pipeline.intervene(abduction, None)[1:])  # the rest is not guided


def test_scm_pipeline_save_load_keeps_its_graph_and_scales(scm_pipeline, tmp_path):
    scm_pipeline.save_pretrained(tmp_path)
    loaded = DiffSCMPipeline.from_pretrained(tmp_path)
    assert loaded.causal_graph.to_config() == scm_pipeline.causal_graph.to_config()
    assert loaded.guidance_scales() == {"brightness": 5.0, "position": 2.0}
    assert type(loaded.classifier).__name__ == "AntiCausalPredictor"


def test_predictor_must_cover_the_graphs_image_parents(scm_pipeline):
    from conftest import TINY_GRAPH

    with pytest.raises(ValueError, match="predicts"):
        DiffSCMPipeline(scm_pipeline.unet, scm_pipeline.scheduler, tiny_classifier(), causal_graph=TINY_GRAPH)


def test_a_generator_list_must_match_the_batch(scm_pipeline):
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    abduction = scm_pipeline.abduct(torch.rand(2, 1, 8, 8), num_inference_steps=2)
    with pytest.raises(ValueError, match="3 generators for 2 samples"):
        scm_pipeline.intervene(abduction, None, eta=0.5, generator=generators)


def test_a_velocity_predicting_unet_is_read_as_the_noise_diffusers_defines():
    pipe = tiny_pipeline(size=8)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    generator = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(3, 1, 8, 8, generator=generator), torch.randn(3, 1, 8, 8, generator=generator)
    for t in (0, 500, 999):
        timesteps = torch.full((3,), t)
        velocity = pipe.scheduler.get_velocity(clean, noise, timesteps)
        noisy = pipe.scheduler.add_noise(clean, noise, timesteps)
        assert torch.allclose(pipe.as_noise(velocity, noisy, t), noise, atol=1e-4)
    null = pipe(torch.rand(2, 1, 8, 8), target=[0, 1], guidance_scale=0.0, num_inference_steps=10,
                output_type="pt", return_reconstruction=True)  # fmt: skip
    assert torch.isfinite(null.images).all() and null.reconstructions.shape == (2, 1, 8, 8)
