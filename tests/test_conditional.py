"""The conditional mechanism x = f(pa, u): eps_theta(x_t, t, pa) inverted under the factual parents and run under the
counterfactual ones, with per-parent classifier-free guidance (the tiny SCM of conftest.TINY_GRAPH)."""

import pytest
import torch
from conftest import TINY_GRAPH, tiny_parent_embedding, tiny_unet

from diffscm import DiffSCMPipeline
from diffscm.evaluation.metrics import count_calls


def quadrant_mass(images: torch.Tensor, position: int) -> torch.Tensor:
    """Ink in the quarter where blobs of `position` lie (0: top-left, 1: bottom-right), per image."""
    half = images.shape[-1] // 2
    quarter = images[..., :half, :half] if position == 0 else images[..., half:, half:]
    return quarter.flatten(1).sum(1)


@pytest.mark.parametrize("cfg_scale", [1.0, {"position": 3.0}])
def test_do_parents_equal_to_the_factual_ones_reconstructs(conditional_pipeline, factual_images, cfg_scale):
    images, labels = factual_images
    factual = {"position": labels, "brightness": 0.75}
    out = conditional_pipeline(
        images, intervention=factual, factual_values=factual, cfg_scale=cfg_scale, output_type="pt",
        return_reconstruction=True,
    )  # fmt: skip
    assert conditional_pipeline.mechanism == "conditional"
    torch.testing.assert_close(out.images, out.reconstructions)
    assert (out.images - images).abs().mean() < 0.02  # the same guided eps both ways: the input comes back


def test_do_position_moves_the_blob_without_any_anti_causal_guidance(conditional_pipeline, factual_images):
    images, labels = factual_images
    out = conditional_pipeline(
        images, intervention={"position": 1 - labels}, factual_values={"brightness": 0.75}, cfg_scale=3.0,
        output_type="pt",
    )  # fmt: skip
    assert conditional_pipeline.guidance_scales() == {"brightness": 0.0, "position": 0.0}
    moved = [quadrant_mass(out.images[i], 1 - labels[i]) > quadrant_mass(out.images[i], labels[i]) for i in range(6)]
    assert sum(bool(m) for m in moved) >= 5


def test_anti_causal_guidance_holds_the_unchanged_parents_unless_told_not_to(conditional_pipeline, factual_images):
    images, labels = factual_images
    factual = {"position": labels, "brightness": torch.full((len(labels),), 0.75)}
    abduction = conditional_pipeline.abduct(images, factual, num_inference_steps=4)
    moved = {"position": 1 - labels, "brightness": factual["brightness"]}
    unguided = conditional_pipeline.intervene(abduction, moved, guidance_scale=0.0)
    held = conditional_pipeline.intervene(abduction, moved, guidance_scale={"brightness": 5.0, "position": 0.0})
    assert (held - unguided).abs().amax(dim=(1, 2, 3)).min() > 1e-3, "by default it holds the unchanged brightness"
    free = DiffSCMPipeline(**conditional_pipeline.components, causal_graph=TINY_GRAPH, hold_unchanged_parents=False)
    free.set_progress_bar_config(disable=True)
    left = free.intervene(abduction, moved, guidance_scale={"brightness": 5.0, "position": 0.0})
    torch.testing.assert_close(left, unguided)  # the mechanism takes the unchanged brightness itself
    steered = free.intervene(abduction, moved, guidance_scale={"brightness": 0.0, "position": 5.0})
    assert (steered - unguided).abs().amax(dim=(1, 2, 3)).min() > 1e-3, "the changed position is guided"
    torch.testing.assert_close(free.intervene(abduction, None), conditional_pipeline.intervene(abduction, None))
    with pytest.raises(ValueError, match="`hold_unchanged_parents` must be True or False"):
        DiffSCMPipeline(**conditional_pipeline.components, causal_graph=TINY_GRAPH, hold_unchanged_parents="yes")


def test_the_mechanism_alone_draws_what_its_parents_say_from_fresh_noise(conditional_pipeline):
    position = torch.tensor([0, 1] * 6)
    values = {"position": position, "brightness": 0.9}
    drawn = conditional_pipeline.generate(values, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert drawn.shape == (12, 1, 8, 8)
    follows = [quadrant_mass(drawn[i], position[i]) > quadrant_mass(drawn[i], 1 - position[i]) for i in range(12)]
    assert sum(bool(f) for f in follows) >= 10
    again = conditional_pipeline.generate(values, generator=torch.Generator().manual_seed(0), output_type="pt")
    torch.testing.assert_close(drawn, again)
    one = conditional_pipeline.generate({"position": 1, "brightness": 0.9}, num_images=3, output_type="np")
    assert one.shape == (3, 8, 8, 1)
    with pytest.raises(ValueError, match="2 values for 3 images"):
        conditional_pipeline.generate({"position": [0, 1], "brightness": 0.9}, num_images=3)


def test_do_brightness_moves_it_the_right_way(conditional_pipeline, factual_images):
    images, labels = factual_images
    factual = {"position": labels, "brightness": 0.75}
    bright = conditional_pipeline(images, intervention={"brightness": 1.0}, factual_values=factual, output_type="pt")
    dim = conditional_pipeline(images, intervention={"brightness": 0.5}, factual_values=factual, output_type="pt")
    top = lambda x: x.flatten(1).topk(9, dim=1).values.mean(1)  # noqa: E731
    assert (top(bright.images) > top(dim.images)).all()


def test_classifier_free_guidance_costs_one_pass_per_guided_parent(conditional_pipeline, factual_images):
    images, labels = factual_images
    factual = {"position": labels, "brightness": 0.75}
    for cfg_scale, passes in ((1.0, 1), ({"position": 2.0}, 2), (2.0, 3)):
        with count_calls(conditional_pipeline.unet) as calls:
            conditional_pipeline.abduct(images, factual, num_inference_steps=4, abduction_refinement_steps=0,
                                        cfg_scale=cfg_scale)  # fmt: skip
        assert calls["samples"] == 4 * 6 * passes


def test_conditional_pipeline_saves_and_loads(conditional_pipeline, factual_images, tmp_path):
    images, labels = factual_images
    conditional_pipeline.save_pretrained(tmp_path)
    loaded = DiffSCMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.mechanism == "conditional" and type(loaded.parent_embedding).__name__ == "ParentEmbedding"
    request = dict(intervention={"position": 1 - labels}, factual_values={"brightness": 0.75}, output_type="pt")
    torch.testing.assert_close(loaded(images, **request).images, conditional_pipeline(images, **request).images)


def test_without_a_predictor_factual_values_must_be_given(conditional_pipeline, factual_images):
    images, labels = factual_images
    unet, scheduler, embedding = (conditional_pipeline.unet, conditional_pipeline.scheduler,
                                  conditional_pipeline.parent_embedding)  # fmt: skip
    pipe = DiffSCMPipeline(unet, scheduler, parent_embedding=embedding, causal_graph=TINY_GRAPH, num_inference_steps=3)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match=r"no anti-causal predictor to read \['brightness'\]"):
        pipe(images, intervention={"position": 1}, factual_values={"position": labels})
    out = pipe(images, intervention={"position": 1}, factual_values={"position": labels, "brightness": 0.7})
    assert len(out.images) == 6 and out.predicted_values == {}
    with pytest.raises(ValueError, match="no anti-causal predictor: `guidance_scale` must be 0"):
        pipe(images, intervention={"position": 1}, factual_values={"position": labels, "brightness": 0.7},
             guidance_scale=1.0)  # fmt: skip


def test_mismatched_conditional_components_are_refused(conditional_pipeline, trained_pipeline):
    with pytest.raises(ValueError, match="class_embed_type='identity' and a `parent_embedding`"):
        DiffSCMPipeline(trained_pipeline.unet, trained_pipeline.scheduler, parent_embedding=tiny_parent_embedding(),
                        causal_graph=TINY_GRAPH)  # fmt: skip
    with pytest.raises(ValueError, match="class_embed_type='identity' and a `parent_embedding`"):
        DiffSCMPipeline(tiny_unet(class_embed_type="identity"), trained_pipeline.scheduler,
                        conditional_pipeline.classifier, causal_graph=TINY_GRAPH)  # fmt: skip
    with pytest.raises(ValueError, match="timestep embedding is 32"):
        from diffscm import ParentEmbedding

        wide = ParentEmbedding(parents=conditional_pipeline.parent_embedding.parents, embedding_dim=64)
        DiffSCMPipeline(conditional_pipeline.unet, trained_pipeline.scheduler, parent_embedding=wide,
                        causal_graph=TINY_GRAPH)  # fmt: skip
    with pytest.raises(ValueError, match="`cfg_scale` needs a conditional mechanism"):
        trained_pipeline(torch.rand(1, 1, 8, 8), target=0, cfg_scale=2.0, num_inference_steps=2)
    with pytest.raises(ValueError, match="needs an anti-causal `classifier`, a `parent_embedding`, or both"):
        DiffSCMPipeline(trained_pipeline.unet, trained_pipeline.scheduler)


def test_a_from_scratch_embedding_tells_parents_apart_and_a_fine_tuning_one_starts_silent():
    from diffscm import ParentEmbedding

    specs = {"digit": {"type": "categorical", "num_classes": 10}, "level": {"type": "continuous", "range": [0, 1]}}
    values = {"digit": torch.tensor([1, 2]), "level": torch.tensor([0.1, 0.9])}
    fresh = ParentEmbedding(parents=specs, embedding_dim=32, zero_init=False)(values)
    assert (fresh[0] - fresh[1]).abs().mean() > 0.1, "different parents, different conditioning from step one"
    silent = ParentEmbedding(parents=specs, embedding_dim=32)(values)
    assert silent.abs().max() == 0, "a pretrained unconditional UNet is unchanged at first"
