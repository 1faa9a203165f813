"""Tiny components and a briefly trained pipeline on synthetic two-class images, all on the CPU and offline."""

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import DDIMScheduler, UNet2DModel  # noqa: E402

from diffscm import (  # noqa: E402
    AntiCausalClassifier,
    AntiCausalPredictor,
    CausalGraph,
    DiffSCMPipeline,
    ParentEmbedding,
)

torch.set_num_threads(1)  # the tiny test models are slower with more threads
ROOT = Path(__file__).resolve().parents[1]


def launch(script: str, *args: str, processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """A training script through `accelerate launch`, offline, one thread a process."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    command += ["--multi_gpu"] if processes > 1 else ["--num_machines", "1", "--mixed_precision", "no"]
    command += ["--dynamo_backend", "no", str(ROOT / "training_scripts" / script), *args]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def tiny_unet(channels: int = 1, size: int = 8, **config) -> UNet2DModel:
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        **config,
    )


def tiny_classifier(channels: int = 1, size: int = 8, num_classes: int = 2) -> AntiCausalClassifier:
    return AntiCausalClassifier(
        sample_size=size,
        in_channels=channels,
        num_classes=num_classes,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        block_out_channels=(8, 16),
        norm_num_groups=4,
        attention_head_dim=4,
    )


# A small SCM over the synthetic images: level -> brightness; position, brightness -> image.
TINY_GRAPH = {
    "nodes": [
        {"name": "level", "type": "continuous", "range": [-3.0, 3.0]},
        {"name": "brightness", "type": "continuous", "range": [0.5, 1.0], "parents": ["level"],
         "mechanism": {"kind": "logistic", "weights": {"level": 1.0}, "scale": 0.5, "low": 0.5, "high": 1.0}},
        {"name": "position", "type": "categorical", "num_classes": 2},
        {"name": "image", "type": "image", "parents": ["brightness", "position"]},
    ]
}  # fmt: skip


def tiny_predictor(size: int = 8) -> AntiCausalPredictor:
    return AntiCausalPredictor(
        sample_size=size,
        parents={
            "brightness": {"type": "continuous", "range": [0.5, 1.0], "conditions": []},
            "position": {"type": "categorical", "num_classes": 2},
        },
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
        head_hidden_dim=16,
    )


def tiny_pipeline(channels: int = 1, size: int = 8, num_classes: int = 2, **config) -> DiffSCMPipeline:
    torch.manual_seed(0)
    pipe = DiffSCMPipeline(
        tiny_unet(channels, size),
        DDIMScheduler(clip_sample=False),
        tiny_classifier(channels, size, num_classes),
        **config,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def two_class_images(num: int, generator: torch.Generator, with_brightness: bool = False):
    """Class 0: a bright 3x3 blob in the top-left quarter of an 8x8 image; class 1: in the bottom-right quarter.
    The blob's brightness is uniform in [0.5, 1] (returned too, with `with_brightness`)."""
    labels = torch.randint(0, 2, (num,), generator=generator)
    images = torch.full((num, 1, 8, 8), -1.0)
    offsets = torch.randint(0, 2, (num, 2), generator=generator)
    brightness = torch.rand(num, generator=generator) * 0.5 + 0.5
    for i in range(num):
        row, col = (offsets[i] + 4 * labels[i] + (1 - labels[i])).tolist()
        images[i, 0, row : row + 3, col : col + 3] = 2 * brightness[i] - 1
    return (images, labels, brightness) if with_brightness else (images, labels)


@pytest.fixture(scope="session")
def trained_pipeline() -> DiffSCMPipeline:
    """A tiny UNet and anti-causal classifier trained for a few seconds: a well-posed DDIM inversion to test."""
    pipe = tiny_pipeline()
    generator = torch.Generator().manual_seed(0)
    scheduler = pipe.scheduler
    for model, steps in ((pipe.unet, 300), (pipe.classifier, 150)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(steps):
            clean, labels = two_class_images(32, generator)
            noise = torch.randn(clean.shape, generator=generator)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (32,), generator=generator)
            noisy = scheduler.add_noise(clean, noise, t)
            if model is pipe.unet:
                loss = F.mse_loss(model(noisy, t).sample, noise)
            else:
                loss = F.cross_entropy(model(noisy, t).logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval().requires_grad_(False)
    return pipe


@pytest.fixture(scope="session")
def scm_pipeline(trained_pipeline) -> DiffSCMPipeline:
    """The trained tiny UNet with a briefly trained two-head predictor (position, brightness) and `TINY_GRAPH`."""
    torch.manual_seed(0)
    predictor = tiny_predictor()
    generator = torch.Generator().manual_seed(1)
    scheduler = trained_pipeline.scheduler
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=3e-3)
    for _ in range(300):
        clean, labels, brightness = two_class_images(32, generator, with_brightness=True)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (32,), generator=generator)
        noisy = scheduler.add_noise(clean, torch.randn(clean.shape, generator=generator), t)
        log_likelihoods = predictor.log_likelihood(noisy, t, {"position": labels, "brightness": brightness})
        loss = -sum(value.mean() for value in log_likelihoods.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    predictor.eval().requires_grad_(False)
    pipe = DiffSCMPipeline(
        trained_pipeline.unet, trained_pipeline.scheduler, predictor, causal_graph=TINY_GRAPH,
        guidance_scale={"position": 2.0, "brightness": 5.0}, num_inference_steps=10, abduction_refinement_steps=1,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.causal_graph, CausalGraph)
    return pipe


@pytest.fixture
def factual_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out synthetic images in [0, 1] (diffusers' convention for tensors) and their labels."""
    images, labels = two_class_images(6, torch.Generator().manual_seed(123))
    return (images + 1) / 2, labels


def tiny_parent_embedding() -> ParentEmbedding:
    """Embeds TINY_GRAPH's image parents for `tiny_unet(class_embed_type="identity")` (timestep embedding 32)."""
    return ParentEmbedding(parents=CausalGraph.from_config(TINY_GRAPH).parent_specs(), embedding_dim=32, hidden_dim=16)


@pytest.fixture(scope="session")
def conditional_pipeline(scm_pipeline) -> DiffSCMPipeline:
    """A tiny conditional mechanism eps(x_t, t, brightness, position), trained with parent dropout 0.2, with the
    scm pipeline's predictor to read factual values."""
    torch.manual_seed(0)
    unet, embedding = tiny_unet(class_embed_type="identity"), tiny_parent_embedding()
    scheduler = scm_pipeline.scheduler
    generator = torch.Generator().manual_seed(2)
    parameters = list(unet.parameters()) + list(embedding.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=3e-3)
    for _ in range(400):
        clean, labels, brightness = two_class_images(32, generator, with_brightness=True)
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (32,), generator=generator)
        dropped = {name: torch.rand(32, generator=generator) < 0.2 for name in ("brightness", "position")}
        labels_embedded = embedding({"brightness": brightness, "position": labels}, dropped)
        loss = F.mse_loss(unet(scheduler.add_noise(clean, noise, t), t, class_labels=labels_embedded).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval().requires_grad_(False)
    embedding.eval().requires_grad_(False)
    pipe = DiffSCMPipeline(
        unet, scheduler, scm_pipeline.classifier, embedding, causal_graph=TINY_GRAPH, guidance_scale=0.0,
        num_inference_steps=10, abduction_refinement_steps=1,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe
