"""Semantic abduction (Rasal et al. 2025): a semantic encoder's z = e(x) conditions the conditional mechanism beside
the parents, x = f(pa, z, u); abduction reads z and inverts u under both, prediction keeps z."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_GRAPH, tiny_parent_embedding, tiny_unet, two_class_images
from diffusers import DDIMScheduler

from diffscm import DiffSCMPipeline, SemanticEncoder


def tiny_encoder(**config) -> SemanticEncoder:
    return SemanticEncoder(
        **{"in_channels": 1, "latent_dim": 4, "embedding_dim": 32, "block_out_channels": (8, 16)} | config
    )


@pytest.fixture(scope="module")
def semantic_pipeline() -> DiffSCMPipeline:
    """A tiny eps(x_t, t, position, brightness, z) trained with its encoder (KL weight 1e-5) on the blob images,
    whose blob offset within its quarter no parent says: z is where it can go."""
    torch.manual_seed(0)
    unet, embedding, encoder = tiny_unet(class_embed_type="identity"), tiny_parent_embedding(), tiny_encoder()
    scheduler = DDIMScheduler(clip_sample=False)
    generator = torch.Generator().manual_seed(3)
    modules = torch.nn.ModuleList([unet, embedding, encoder])
    optimizer = torch.optim.AdamW(modules.parameters(), lr=3e-3)
    for _ in range(300):
        clean, labels, brightness = two_class_images(32, generator, with_brightness=True)
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (32,), generator=generator)
        mean, log_variance = encoder(clean)
        latent = mean + (0.5 * log_variance).exp() * torch.randn(mean.shape, generator=generator)
        labels_embedded = embedding({"brightness": brightness, "position": labels}) + encoder.embed(latent)
        predicted = unet(scheduler.add_noise(clean, noise, t), t, class_labels=labels_embedded).sample
        loss = F.mse_loss(predicted, noise) + 1e-5 * SemanticEncoder.kl(mean, log_variance).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    modules.eval().requires_grad_(False)
    pipe = DiffSCMPipeline(
        unet, scheduler, parent_embedding=embedding, semantic_encoder=encoder, causal_graph=TINY_GRAPH,
        num_inference_steps=10, integrator="bdia",
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("integrator, refinements, cfg_scale", [("bdia", 0, 1.0), ("ddim", 2, {"position": 2.0})])
def test_the_null_intervention_returns_the_input_and_the_abduction_carries_z(
    semantic_pipeline, factual_images, integrator, refinements, cfg_scale
):
    images, labels = factual_images
    factual = {"position": labels, "brightness": 0.75}
    abduction = semantic_pipeline.abduct(
        images, factual, integrator=integrator, abduction_refinement_steps=refinements, cfg_scale=cfg_scale
    )
    assert abduction.semantic_latent.shape == (6, 4)
    torch.testing.assert_close(abduction.semantic_latent, semantic_pipeline.semantic_encoder(images * 2 - 1)[0])
    back = semantic_pipeline.intervene(abduction, factual)
    assert (back - images).abs().mean() < (0.001 if integrator == "bdia" else 0.02)


def test_z_conditions_both_ways_and_each_sample_keeps_its_own(semantic_pipeline, factual_images):
    images, labels = factual_images
    factual = {"position": labels, "brightness": 0.75}
    abduction = semantic_pipeline.abduct(images, factual)
    swapped = abduction.__class__(**{**abduction, "semantic_latent": abduction.semantic_latent.flip(0)})
    assert (semantic_pipeline.intervene(swapped, factual) - images).abs().mean() > 0.01, "z is read"
    twice = abduction.repeat_interleave(2)
    torch.testing.assert_close(twice.semantic_latent[::2], abduction.semantic_latent)
    brighter = semantic_pipeline(images, intervention={"brightness": 1.0}, factual_values=factual, output_type="pt")
    ink = lambda x: x.flatten(1).max(1).values  # noqa: E731
    assert (ink(brighter.images) > ink(images)).float().mean() >= 0.8, "do(brightness) still acts"


def test_generate_draws_z_from_its_prior_reproducibly(semantic_pipeline):
    values = {"position": torch.tensor([0, 1, 0, 1]), "brightness": 0.9}
    first = semantic_pipeline.generate(values, generator=torch.Generator().manual_seed(0), output_type="pt")
    again = semantic_pipeline.generate(values, generator=torch.Generator().manual_seed(0), output_type="pt")
    torch.testing.assert_close(first, again)
    assert first.shape == (4, 1, 8, 8)


def test_the_folder_round_trip_keeps_the_encoder(semantic_pipeline, factual_images, tmp_path):
    images, labels = factual_images
    semantic_pipeline.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "semantic_encoder" / "config.json").is_file()
    loaded = DiffSCMPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.semantic_encoder, SemanticEncoder)
    request = {"intervention": {"brightness": 1.0}, "factual_values": {"position": labels, "brightness": 0.75}}
    torch.testing.assert_close(
        loaded(images, output_type="pt", **request).images,
        semantic_pipeline(images, output_type="pt", **request).images,
    )


def test_bad_components_and_abductions_are_refused_by_name(semantic_pipeline, conditional_pipeline, factual_images):
    unet, scheduler = semantic_pipeline.unet, semantic_pipeline.scheduler
    with pytest.raises(ValueError, match="needs a `parent_embedding`"):
        DiffSCMPipeline(tiny_unet(), scheduler, conditional_pipeline.classifier, semantic_encoder=tiny_encoder())
    with pytest.raises(ValueError, match="64-wide embedding; the UNet takes 1 channels and a 32-wide one"):
        DiffSCMPipeline(
            unet, scheduler, parent_embedding=tiny_parent_embedding(), semantic_encoder=tiny_encoder(embedding_dim=64),
            causal_graph=TINY_GRAPH,
        )  # fmt: skip
    with pytest.raises(ValueError, match="latent_dim"):
        tiny_encoder(latent_dim=0)
    images, labels = factual_images
    factual = {"position": labels, "brightness": 0.75}
    semantic = semantic_pipeline.abduct(images, factual)
    with pytest.raises(ValueError, match="has no `semantic_encoder`"):
        conditional_pipeline.intervene(semantic, factual)
    plain = conditional_pipeline.abduct(images, factual)
    with pytest.raises(ValueError, match=r"`semantic_latent` must be a tensor \(6, 4\)"):
        semantic_pipeline.intervene(plain, factual)
    broken = semantic.__class__(**{**semantic, "semantic_latent": semantic.semantic_latent * float("nan")})
    with pytest.raises(ValueError, match="NaN"):
        semantic_pipeline.intervene(broken, factual)
